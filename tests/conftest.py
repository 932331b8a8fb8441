import os
from pathlib import Path

import pytest


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
