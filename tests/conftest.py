import os
import tempfile
from pathlib import Path

import pytest

# the CLI keeps compiled programs in the user's cache folder: tests (and the processes they
# start, which inherit the environment) use a folder of their own
os.environ.setdefault("SCALEMEM_CACHE_DIR", tempfile.mkdtemp(prefix="scalemem-test-cache-"))


def fashion_mnist_dir() -> Path | None:
    """The Fashion-MNIST folder named by SCALEMEM_FASHION_MNIST, if it holds the IDX files."""
    d = os.environ.get("SCALEMEM_FASHION_MNIST")
    if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
        return Path(d)
    return None


@pytest.fixture
def fmnist_dir():
    d = fashion_mnist_dir()
    if d is None:
        pytest.skip("set SCALEMEM_FASHION_MNIST to a folder with the Fashion-MNIST IDX files")
    return d
