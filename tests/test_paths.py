"""Every feature on every path: {resident, streamed} × {1 device, 4 devices, 2 processes} ×
{init normal, init kmeans, key_bias, cosine schedule, precision setting, L-BFGS} (and one_pass
on the streamed cells) give the same K as the resident one-device fit.

The 4-device layout (fake CPU devices) and the 2-process layout (``jax.distributed`` on
127.0.0.1 with gloo collectives) run in fresh processes (``tests/paths_child.py``), because
the device count and the multi-process runtime are fixed when JAX starts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from paths_child import cells, fit_cell

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("paths_child.py")


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _run(procs, timeout=600):
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-2000:] + err[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Runs the 4-device child and the two processes side by side; returns their folders."""
    four = tmp_path_factory.mktemp("four-devices")
    two = tmp_path_factory.mktemp("two-processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pipe = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs = [subprocess.Popen([sys.executable, str(CHILD), str(four)], **pipe, env=_env(
        XLA_FLAGS="--xla_force_host_platform_device_count=4"))]
    procs += [subprocess.Popen([sys.executable, str(CHILD), str(two), "--process", str(i),
                                "--processes", "2", "--port", str(port)], **pipe, env=_env())
              for i in range(2)]
    _run(procs)
    return {"4 devices": four, "2 processes": two}


_REFERENCE: dict = {}


def _reference(feature: str):
    """The resident one-device fit (for one_pass, which reads streamed data only: the
    streamed one-device fit)."""
    if feature not in _REFERENCE:
        _REFERENCE[feature] = fit_cell("streamed" if feature == "one_pass" else "resident",
                                       feature)
    return _REFERENCE[feature]


def _assert_same(K, bias, ref):
    # Only the summation order of the float64 sums (per device, then a psum) and the chunk
    # boundaries differ between the cells; the ridge solve at nearly uniform attention
    # amplifies those rounding differences to ~1e-9 of K in float64 (measured), and float32
    # products (the precision cell) to ~1e-6. rtol 1e-5 of K's scale is the required agreement,
    # far below how far K moves in 10 steps (> 1e-3 of its scale).
    scale = float(np.max(np.abs(np.asarray(ref.K))))
    assert float(np.max(np.abs(np.asarray(K) - np.asarray(ref.K)))) <= 1e-5 * scale
    if ref.bias is not None:
        b = np.asarray(ref.bias)
        assert float(np.max(np.abs(np.asarray(bias) - b))) <= 1e-5 * float(np.max(np.abs(b)))


@pytest.mark.parametrize("residency, feature", cells())
def test_one_device(residency, feature):
    mem = fit_cell(residency, feature)
    _assert_same(mem.K, mem.bias, _reference(feature))


@pytest.mark.parametrize("layout", ["4 devices", "2 processes"])
@pytest.mark.parametrize("residency, feature", cells())
def test_devices_and_processes(layouts, layout, residency, feature):
    saved = np.load(layouts[layout] / f"{residency}-{feature}.npz")
    _assert_same(saved["K"], saved["bias"] if "bias" in saved else None, _reference(feature))


def test_the_fits_move():
    """The comparisons above would be empty if K stayed at K₀."""
    import jax

    from paths_child import KEY_DIM, P
    from scalemem._engine import normal_keys

    ref = _reference("init_normal")
    with jax.enable_x64(True):
        K0 = np.asarray(normal_keys(P, KEY_DIM, 0, "float64"))
    assert float(np.max(np.abs(np.asarray(ref.K) - K0))) > 1e-3 * float(np.max(np.abs(K0)))
