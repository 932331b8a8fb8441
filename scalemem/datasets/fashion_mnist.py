"""Fashion-MNIST: IDX reader, checked downloader, and the seed article's reference protocol.

The protocol (from the article that scalemem grew out of): rows are the 60,000 training images
followed by the 10,000 test images, values are all 784 pixels / 255, keys are 78 pixels chosen by
``jax.random.choice(PRNGKey(1), 784, (78,), replace=False)``, rows are permuted by
``jax.random.permutation(PRNGKey(0), 70000)``; the first 10,000 permuted rows are fit and the
other 60,000 tested.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np

from .._errors import DataError, DownloadError

__all__ = ["FILES", "OFFICIAL_MD5", "OFFICIAL_URL", "read_idx", "load", "download",
           "key_columns", "permutation", "reference_split", "SPLITS"]

FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# md5 of the official gzipped files, as published by the Fashion-MNIST project
OFFICIAL_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ROWS, PIXELS, KEY_PIXELS = 70000, 784, 78
# Named row ranges in the reference permutation (half-open [start, stop)).
SPLITS = {"fit10k": (0, 10000), "test60k": (10000, 70000),  # the seed article's split
          "fit60k": (0, 60000), "test10k": (60000, 70000),  # the full-data split
          "all": (0, 70000)}

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed); errors name the file and what is wrong."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: IDX header truncated")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != need:
        raise DataError(f"{path}: IDX body has {len(raw) - head} bytes, shape {shape} needs {need}")
    return np.frombuffer(raw, dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"{data_dir}: no {stem}[.gz]. Put the four Fashion-MNIST IDX files there "
        f"({', '.join(f + '.gz' for f in FILES.values())}), or fetch them with "
        "scalemem.datasets.fashion_mnist.download(DIR) on a machine with internet access.")


def load(data_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)``: (70000, 784) uint8 and (70000,) uint8, train rows then test rows."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: Fashion-MNIST folder not found")
    parts = {k: read_idx(_find(d, v)) for k, v in FILES.items()}
    for split in ("train", "test"):
        im, lb = parts[f"{split}_images"], parts[f"{split}_labels"]
        if im.ndim != 3 or im.shape[1:] != (28, 28) or lb.shape != (im.shape[0],):
            raise DataError(f"{d}: {split} images {im.shape} and labels {lb.shape} do not match "
                            "Fashion-MNIST's layout (N×28×28 and N)")
    return (np.concatenate([parts["train_images"], parts["test_images"]]).reshape(-1, PIXELS),
            np.concatenate([parts["train_labels"], parts["test_labels"]]))


def _md5(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download(data_dir: str | os.PathLike, base_url: str = OFFICIAL_URL, timeout: float = 30.0
             ) -> Path:
    """Download the four official files into ``data_dir`` and check their official md5.

    Files already present with the right checksum are kept. A file is written to a temporary name
    and renamed only after its checksum matched, so a failed download never leaves a half-written
    file behind. Offline, raises :class:`DownloadError` telling you to pass a local folder instead.
    """
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name, md5 in OFFICIAL_MD5.items():
        target = d / name
        if target.is_file() and _md5(target) == md5:
            continue
        url = base_url.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as r:
                shutil.copyfileobj(r, out)
            got = _md5(Path(tmp))
            if got != md5:
                raise DownloadError(f"{url}: md5 {got} does not match the official {md5}")
            os.replace(tmp, target)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise DownloadError(
                f"could not download {url} ({e}). Without internet access, copy the four IDX "
                f"files into a folder and pass it (--data-dir DIR / load(DIR)).") from e
        finally:
            Path(tmp).unlink(missing_ok=True)
    return d


def key_columns() -> np.ndarray:
    """The 78 key pixels: ``jax.random.choice(PRNGKey(1), 784, (78,), replace=False)``."""
    return np.asarray(jax.random.choice(jax.random.PRNGKey(1), PIXELS, (KEY_PIXELS,),
                                        replace=False))


def permutation() -> np.ndarray:
    """The reference row order: ``jax.random.permutation(PRNGKey(0), 70000)``."""
    return np.asarray(jax.random.permutation(jax.random.PRNGKey(0), ROWS))


def reference_split(data_dir, fit: str = "fit10k", test: str = "test60k", dtype=np.float32):
    """``(Q_fit, X_fit, Q_test, X_test)`` of the reference protocol, values scaled to [0, 1]."""
    X = load(data_dir)[0][permutation()].astype(dtype) / dtype(255.0)
    cols = key_columns()
    out = []
    for name in (fit, test):
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
        a, b = SPLITS[name]
        out += [np.ascontiguousarray(X[a:b][:, cols]), X[a:b]]
    return tuple(out)
