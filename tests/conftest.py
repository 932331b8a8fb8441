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


# ---- no command dies by a signal or shows a traceback (issue 13) ---------------------------------
# Every `scalemem` run in the suite, in this process (cli.main) or in a child process, is watched:
# a child killed by a signal the test did not send, a "Traceback" in a child's captured stderr, or
# an exception other than SystemExit (argparse's usage errors) escaping cli.main fails the test.
# Tests that run code which must raise on purpose say so with @pytest.mark.traceback_expected;
# tests where JAX's runtime ends a process on purpose, with @pytest.mark.signal_expected.

TRACEBACK = "Traceback (most recent call last)"


def pytest_configure(config):
    config.addinivalue_line("markers", "traceback_expected: a child process may print a Python "
                            "traceback on purpose (not a scalemem command)")
    config.addinivalue_line("markers", "signal_expected: a child process may be ended by a "
                            "signal that the test did not send (JAX's runtime aborts it)")


@pytest.fixture(autouse=True)
def _no_signal_deaths_or_tracebacks(request, monkeypatch):
    import subprocess

    from scalemem._run import cli

    problems: list[str] = []
    children: list = []
    allow_traceback = request.node.get_closest_marker("traceback_expected") is not None
    allow_signal = request.node.get_closest_marker("signal_expected") is not None

    class Watched(subprocess.Popen):
        def __init__(self, args, *a, **kw):
            super().__init__(args, *a, **kw)
            self.signalled, self.argv = False, ([str(a)[:60] for a in args][:4]
                                                if isinstance(args, (list, tuple)) else args)
            children.append(self)

        def send_signal(self, sig):  # kill() and terminate() come here too
            self.signalled = True
            super().send_signal(sig)

        def communicate(self, *a, **kw):
            out, err = super().communicate(*a, **kw)
            for text in (out, err):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                if not allow_traceback and text and TRACEBACK in text:
                    problems.append(f"{self.argv!r} printed a traceback:\n{text[-2000:]}")
            return out, err

    real_main = cli.main

    def main(argv=None):
        try:
            return real_main(argv)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as e:
            problems.append(f"cli.main({argv!r}) let {type(e).__name__}: {e} escape (a user "
                            "would see a traceback)")
            raise

    monkeypatch.setattr(subprocess, "Popen", Watched)
    monkeypatch.setattr(cli, "main", main)
    yield
    for p in children:
        if p.returncode is not None and p.returncode < 0 and not (p.signalled or allow_signal):
            problems.append(f"{p.argv!r} died by signal {-p.returncode}")
    assert not problems, "\n".join(problems)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: every executable keeps memory
    mappings of its JIT code, and the whole suite in one process would otherwise reach the
    kernel's limit on mappings (vm.max_map_count, 65530), where LLVM fails with "Cannot
    allocate memory" while RAM is free."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
