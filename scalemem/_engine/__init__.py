"""The engine: resident or streamed rows over a mesh of devices and processes, the one fit
loop, the model with its prediction kernel, and model files."""

from .distributed import initialize, is_writer
from .fitting import FitResult, fit, fit_data, fit_source
from .init import kmeans_pp, normal_keys
from .loop import FitInterrupted, LoopState, StepReport, fit_engine
from .model import Memory, evaluate, predict_in_chunks
from .modelio import load, load_with_metadata, read_metadata, save
from .profiled import ProfiledLoss, profiled_loss

__all__ = ["profiled_loss", "ProfiledLoss", "initialize", "is_writer", "FitResult", "fit",
           "fit_data", "fit_source", "kmeans_pp",
           "normal_keys", "FitInterrupted", "LoopState", "StepReport", "fit_engine", "Memory",
           "evaluate", "predict_in_chunks", "load", "load_with_metadata", "read_metadata", "save"]
