"""The settings of the commands besides those of ``fit`` (:mod:`scalemem._config`), declared
like them: one field, one name, one help text."""

from __future__ import annotations

import dataclasses

from .._config import DataConfig, FitConfig, Validated, same, setting

__all__ = ["Session", "FitSession", "EvalConfig", "PredictConfig", "FashionMNISTConfig",
           "SyntheticConfig", "ReproduceConfig"]

_FORMAT = dict(choices=("zarr", "hdf5"), metavar="{zarr,hdf5}")


@dataclasses.dataclass(frozen=True)
class Session(Validated):
    """How a command talks: where its settings come from and what it prints."""

    config: str | None = setting(None, "TOML file with settings for this command (top-level keys "
                                 "and a [COMMAND] table; command-line flags win)", metavar="FILE",
                                 toml=False)
    json: bool = setting(False, "print one JSON object with the result on stdout (human-readable "
                         "text goes to stderr)")
    quiet: bool = setting(False, "no progress bar and no human-readable messages (errors and "
                          "warnings still go to stderr)")


@dataclasses.dataclass(frozen=True)
class FitSession(Session):
    resume: str | None = setting(None, "continue the run in folder RUN from its newest checkpoint "
                                 "(settings default to the run's config.json; the result is "
                                 "bit-identical to an uninterrupted fit)", metavar="RUN")
    overwrite: bool = setting(False, "start over in an --out folder that already holds a run")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Validated):
    run: str | None = setting(None, "a run folder (or a model .npz file) to evaluate",
                              positional=True, metavar="RUN")
    store: str | None = same(DataConfig, "store", help="the store to evaluate on (default: the "
                             "store the model was fitted on)")
    keys: str | None = same(DataConfig, "keys")
    values: str | None = same(DataConfig, "values")
    rows: str | None = same(DataConfig, "rows")
    values_are_labels: bool = same(DataConfig, "values_are_labels")
    chunk_rows: int = setting(8192, "rows per evaluated chunk", lo=1, metavar="R")
    plots: bool = setting(False, "write pictures to the run folder (for a model file, to the "
                          "folder MODEL-plots beside it): training and validation curves, RMSE "
                          "against P (one line per group of sibling runs with the same fit "
                          "settings, evaluated on the same rows), and a grid of original / key "
                          "pixels / prediction for 784-column values or a confusion matrix for "
                          "a label model (needs matplotlib)")


@dataclasses.dataclass(frozen=True)
class PredictConfig(Validated):
    model: str | None = setting(None, "a model .npz file or a run folder", positional=True,
                                metavar="MODEL")
    store: str | None = same(DataConfig, "store", help="the store with the keys (default: the "
                             "store the model was fitted on)")
    keys: str | None = same(DataConfig, "keys")
    rows: str | None = same(DataConfig, "rows")
    out: str | None = setting(None, "store to write: a Zarr directory, or an HDF5 file "
                              "(.h5/.hdf5); array 'predictions' (rows × value columns), plus "
                              "'predicted_labels' for a label model", metavar="OUT")
    format: str | None = setting(None, "format of --out (default: from its suffix, zarr otherwise)",
                                 **_FORMAT)
    chunk_rows: int = setting(8192, "rows predicted and written per chunk", lo=1, metavar="R")
    overwrite: bool = setting(False, "replace an existing --out")


@dataclasses.dataclass(frozen=True)
class FashionMNISTConfig(Validated):
    from_dir: str | None = setting(None, "folder with the four Fashion-MNIST IDX files (.gz or "
                                   "raw)", flag="--from", metavar="DIR")
    out: str | None = setting(None, "store to write (Zarr directory or HDF5 file)", metavar="STORE")
    format: str | None = setting(None, "store format (default: hdf5 for a .h5/.hdf5 name, else "
                                 "zarr)", **_FORMAT)
    download: bool = setting(False, "download the official files into --from first (needs "
                             "internet; checked against the official md5)")
    chunk_rows: int | None = setting(None, "rows per stored chunk (default: 16384)", type=int, lo=1,
                                     metavar="R")
    overwrite: bool = setting(False, "replace an existing store")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(Validated):
    out: str | None = same(FashionMNISTConfig, "out")
    rows: int | None = setting(None, "number of rows", type=int, lo=1, metavar="N")
    key_dim: int = setting(78, "key columns", lo=1, metavar="M")
    value_dim: int = setting(784, "value columns", lo=1, metavar="N")
    latent_dim: int = setting(8, "latent dimension of the generator", lo=1, metavar="D")
    noise: float = setting(0.05, "noise level", lo=0.0, metavar="X")
    dtype: str = setting("uint8", "stored dtype (uint8 data gets views scaled by 1/255)",
                         choices=("uint8", "float32"), metavar="{uint8,float32}")
    format: str | None = same(FashionMNISTConfig, "format")
    seed: int = setting(0, "generator seed", lo=0, metavar="N")
    chunk_rows: int | None = setting(None, "rows per stored chunk (default: 4096-16384, chunks ≤ "
                                     "16 MiB)", type=int, lo=1, metavar="R")
    overwrite: bool = same(FashionMNISTConfig, "overwrite")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig(Validated):
    data_dir: str | None = same(FashionMNISTConfig, "from_dir", flag=None)
    out: str | None = setting(None, "output folder (default: runs/reproduce-DATE-TIME, as fit's "
                              "runs/fit-DATE-TIME)", metavar="OUT")
    download: bool = same(FashionMNISTConfig, "download", help="download the official files into "
                          "--data-dir first (needs internet; checked against the official md5)")
    prototypes: list | None = setting(None, "comma-separated P values (default: "
                                      "2,4,8,16,32,64,128,256)", type="ints", lo=1, metavar="P,P,…")
    fit_split: str = setting("fit10k", "rows to fit: fit10k (the article's) or fit60k (full data)",
                             choices=("fit10k", "fit60k"), metavar="NAME")
    test_split: str | None = setting(None, "rows to test: test60k or test10k (default: the "
                                     "complement of --fit-split)", choices=("test60k", "test10k"),
                                     metavar="NAME")
    plot: bool = setting(True, "write the PNG of RMSE against P (beside the article's table, "
                         "each line saying how many steps it ran)")
    recipe: str = same(FitConfig, "recipe", default="seed")
