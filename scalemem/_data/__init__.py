"""Data: sources (in-memory arrays, HDF5, Zarr, one-hot labels) read through views, the
read-ahead stream of row blocks, and the writer of checksummed stores."""

from .labels import LabelSource, one_hot
from .source import (OVERFLOW_HINT, RowRange, Source, WithBiasColumn, check_source,
                     locate_nonfinite)
from .sources import ArraySource, HDF5Source, ZarrSource, aligned_empty, is_aligned, open_source
from .stores import META_KEY, MISSING_CHUNKS, meta_digest, store_format
from .stream import READER_THREAD_NAME, Block, ChunkStream, release_free_heap
from .views import View, parse_view
from .writer import StoreWriter, default_chunk_rows, write_fashion_mnist, write_synthetic

__all__ = ["Source", "check_source", "RowRange", "WithBiasColumn", "locate_nonfinite",
           "OVERFLOW_HINT", "ArraySource", "HDF5Source", "ZarrSource", "open_source",
           "aligned_empty", "is_aligned", "META_KEY", "MISSING_CHUNKS", "meta_digest",
           "store_format", "View", "parse_view", "ChunkStream", "Block", "READER_THREAD_NAME",
           "release_free_heap", "StoreWriter", "default_chunk_rows", "write_fashion_mnist",
           "write_synthetic", "LabelSource", "one_hot"]
