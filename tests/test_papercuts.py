"""Papercuts of issue 14: ``--version``, each command's help, h5py-style paths and negative
columns in view specs, the ``py.typed`` marker in the wheel, and a short ``Memory`` repr.
Nothing here fits a model."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

import scalemem
from scalemem import ConfigError, DataError
from scalemem._data import LabelSource, open_source, parse_view
from scalemem._run import cli

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = [["data", "fashion-mnist"], ["data", "synthetic"], ["fit"], ["eval"], ["predict"],
               ["reproduce"]]
ALL_HELP = [[], ["data"]] + SUBCOMMANDS


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


# ---- 1: --version ----------------------------------------------------------------------------

def test_version_prints_the_package_version_and_exits_0(capsys):
    """A regression test: HEAD already answers --version (see the report of issue 14)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    version = importlib.metadata.version("scalemem")
    assert capsys.readouterr().out == f"scalemem {version}\n"
    assert scalemem.__version__ == version


# ---- 2: help of each command -----------------------------------------------------------------

@pytest.mark.parametrize("argv", ALL_HELP, ids=lambda a: " ".join(a) or "top")
def test_help_fits_an_80_column_terminal(argv, capsys, monkeypatch):
    """Descriptions and epilogs are wrapped like the option help (they were single lines of
    up to 330 characters)."""
    monkeypatch.setenv("COLUMNS", "80")
    long = [line for line in _help(argv, capsys).splitlines() if len(line) > 80]
    assert not long, long


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_only_fit_talks_of_resume_and_checkpoints(argv, capsys):
    """A regression test (HEAD already gives each command its own text): the SIGINT/--resume
    epilog belongs to `fit` alone."""
    text = " ".join(_help(argv, capsys).split()).lower()
    cmd = next(c for c in cli.COMMANDS if c.key == " ".join(argv))
    assert ("resume" in text and "checkpoint" in text) == (argv == ["fit"]), text[-300:]
    assert " ".join(cmd.description.split()[:5]).lower() in text  # its own description


@pytest.mark.parametrize("argv", SUBCOMMANDS, ids=" ".join)
def test_boolean_flags_read_naturally(argv, capsys):
    """A regression test: `--plot, --no-plot`, never `--no-no-plot`."""
    text = _help(argv, capsys)
    assert "--no-no-" not in text
    cmd = next(c for c in cli.COMMANDS if c.key == " ".join(argv))
    for f in cmd.fields():
        if f.metadata["type"] is bool and not f.metadata["positional"]:
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            assert not flag.startswith("--no-"), flag
            assert f"{flag}, --no-{flag[2:]}" in text


# ---- 3: view specs: h5py-style paths, negative columns ----------------------------------------

@pytest.mark.parametrize("spec, array, columns", [
    ("/grp/x", "grp/x", None),
    ("/pixels[@/grp/idx]/255", "pixels", ("grp/idx",)),
    ("x[-1]", "x", (-1,)),
    ("x[-3:]", "x", (slice(-3, None),)),
    ("x[:-2]", "x", (slice(None, -2),)),
    ("/a/b [ 0 , -4::2 , @ /c ] * 2", "a/b", (0, slice(-4, None, 2), "c")),
])
def test_view_specs_take_h5py_paths_and_negative_columns(spec, array, columns):
    view = parse_view(spec, "keys")
    assert (view.array, view.columns) == (array, columns)


@pytest.mark.parametrize("spec", ["//x", "/", "x/", "/ x", "@/x", "/x[0]]", "x//y"])
def test_a_malformed_path_is_a_config_error_naming_the_spec_and_the_syntax(spec):
    with pytest.raises(ConfigError) as e:
        parse_view(spec, "values")
    assert (e.value.field, e.value.value) == ("values", spec)
    assert "'/group/pixels[-10:]'" in str(e.value)  # the examples show paths and negatives


@pytest.fixture(scope="module", params=["zarr", "h5"])
def nested(request, tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A store written by another tool: a group ``grp`` holding a 20×6 array ``x`` and labels."""
    x = np.arange(120, dtype=np.float32).reshape(20, 6)
    labels = np.stack([np.arange(20) % 3, np.arange(20) % 5], axis=1).astype(np.int32)
    path = tmp_path_factory.mktemp("nested") / f"s.{request.param}"
    if request.param == "zarr":
        grp = zarr.open_group(str(path), mode="w").create_group("grp")
        grp.create_array("x", shape=x.shape, dtype=x.dtype)[:] = x
        grp.create_array("labels", shape=labels.shape, dtype=labels.dtype)[:] = labels
    else:
        with h5py.File(path, "w") as f:
            f.create_dataset("grp/x", data=x)
            f.create_dataset("grp/labels", data=labels)
    return path, x


@pytest.mark.parametrize("keys, values, want_keys, want_values", [
    ("/grp/x[-3:]", "grp/x[:-2]", np.s_[:, 3:], np.s_[:, :4]),
    ("/grp/x[-1]", "/grp/x[0,-1,-6]/2", np.s_[:, [5]], np.s_[:, [0, 5, 0]]),
    ("grp/x[-6:-4, -2::1]", "/grp/x", np.s_[:, [0, 1, 4, 5]], np.s_[:, :]),
], ids=["slices", "columns", "mixed"])
def test_nested_arrays_and_negative_columns_read_like_numpy(nested, keys, values, want_keys,
                                                            want_values):
    path, x = nested
    with open_source(path, keys=keys, values=values, rows="5:15") as src:
        Q, X = src.read(0, src.rows)
    np.testing.assert_array_equal(Q, x[5:15][want_keys])
    np.testing.assert_array_equal(X, x[5:15][want_values])


@pytest.mark.parametrize("spec, shown", [("/grp/x[-7]", "column -7"),
                                         ("/grp/x[-9:]", "column slice -9:"),
                                         ("/grp/x[:-7]", "column slice :-7")])
def test_a_negative_column_before_the_first_is_a_config_error(nested, spec, shown):
    with pytest.raises(ConfigError) as e:
        open_source(nested[0], keys=spec, values="/grp/x")
    assert (e.value.field, e.value.value) == ("keys", spec)
    assert shown in str(e.value) and "outside the 6 columns" in str(e.value)


def test_a_missing_nested_array_is_a_data_error(nested):
    with pytest.raises(DataError, match="no array 'grp/nosuch'"):
        open_source(nested[0], keys="/grp/nosuch", values="/grp/x")


def test_a_label_view_takes_a_negative_column(nested):
    path = nested[0]
    with LabelSource(path, "/grp/x", "/grp/labels[-1]", classes=5) as src:
        _, Y = src.read(0, src.rows)
    np.testing.assert_array_equal(Y.argmax(axis=1), np.arange(20) % 5)
    with pytest.raises(DataError, match="one column"):
        LabelSource(path, "/grp/x", "/grp/labels[-3]", classes=5)


def test_paths_and_negative_columns_parse_in_linear_time():
    """30k-character specs with deep paths and many negative columns: about a millisecond."""
    deep = "/" + "g/" * 5000 + "x[" + ",".join(["-1", "-3:", ":-2", "-6::2"] * 1500) + "]/255"
    t0 = time.perf_counter()
    view = parse_view(deep, "keys")
    assert view.array.count("/") == 5000 and len(view.columns) == 6000
    for hostile in ("/" * 20_000 + "x", "x[" + "-" * 20_000 + "1]", "/g" * 10_000 + "/"):
        with pytest.raises(ConfigError):
            parse_view(hostile, "keys")
    assert time.perf_counter() - t0 < 1.0  # the linear parser: a few ms; a cubic one: minutes


# ---- 4: py.typed -------------------------------------------------------------------------------

def test_py_typed_is_in_the_package_and_the_wheel(tmp_path):
    """The marker exists, and setuptools' build_py (what a wheel holds) copies it: built from
    a copy of the project, so nothing is written into the working tree."""
    assert importlib.resources.files("scalemem").joinpath("py.typed").is_file()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "scalemem", tmp_path / "scalemem",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q",
                          "build_py", "--build-lib", "out"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "scalemem" / "py.typed").is_file()


# ---- 5: Memory's repr ----------------------------------------------------------------------------

def test_memory_repr_is_one_short_line_without_the_arrays():
    rng = np.random.default_rng(0)
    K = rng.standard_normal((300, 78)).astype(np.float32)
    V = rng.standard_normal((300, 784)).astype(np.float32)
    plain = scalemem.Memory(K, V)
    assert repr(plain) == ("Memory(P=300, key_dim=78, value_dim=784, dtype=float32, bias=no, "
                           "key_scale=None, value_scale=None)")
    biased = dataclasses.replace(plain, bias=np.zeros(300, np.float32), key_scale=0.5,
                                 value_scale=0.25)
    text = repr(biased)
    assert "bias=yes" in text and "key_scale=0.5" in text and "value_scale=0.25" in text
    assert str(biased) == text and "\n" not in text and len(text) < 120
