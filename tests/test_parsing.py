"""Parsing the user's inputs (issue 13): view specs, TOML files, a run's config.json, the
metrics file and sibling eval.json files. Every bad input is a typed scalemem error (or, for
files that are only read, a skip with a note), in linear time: never another exception, never
a hang. No test here fits a model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalemem import CheckpointError, ConfigError, DataError
from scalemem._config import (MAX_CLASSES, MAX_SEED, DataConfig, FitConfig, RunConfig, build,
                              check_value)
from scalemem._data import LabelSource, StoreWriter, open_source, parse_view
from scalemem._run import cli
from scalemem._run.metrics import MetricsWriter, read_metrics, truncate_metrics
from scalemem._run.runs import RUN_FORMAT

FIT = next(c for c in cli.COMMANDS if c.key == "fit")
# derandomized: the same examples on every run; 60 examples of each kind take a few seconds
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
# What a bad input may raise: the acceptance criterion of issue 13.
TYPED = (ConfigError, DataError)
# Parsing one input takes well under a millisecond; 0.1 s is the bound the issue sets. A loaded
# machine can stall any single call (a GC pause, a descheduled process), so a call over the
# bound is timed once more and the faster of the two must meet it: a stall does not repeat,
# a superlinear parser (the old one took 1.3 s for 1,000 spaces) does.
BOUND_S = 0.1


def _typed_within_bound(call):
    """Run ``call``: it returns or raises one of TYPED, within BOUND_S (see above)."""
    best = None
    for _ in range(2):
        t0 = time.perf_counter()
        try:
            out = call()
        except TYPED as e:
            out = e
        best = min(best or 1e9, time.perf_counter() - t0)
        if best <= BOUND_S:
            return out
    raise AssertionError(f"took {best:.3f} s, more than {BOUND_S} s")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tiny store: 50×6 pixels, an index array of columns and integer labels."""
    path = tmp_path_factory.mktemp("parsing") / "tiny.zarr"
    rng = np.random.default_rng(0)
    with StoreWriter(path, "zarr") as w:
        w.create_array("pixels", (50, 6), np.uint8).append(rng.integers(0, 255, (50, 6), np.uint8))
        w.write_array("cols", np.array([0, 2, 4], np.int32))
        w.write_array("labels", rng.integers(0, 3, 50).astype(np.int64))
        w.meta.update(rows=50, splits={"fit": [0, 40]},
                      views={"keys": "pixels[@cols]/255", "values": "pixels/255"})
    return path


# ---- case 3: view specs ---------------------------------------------------------------------

# 1 s: the linear parser needs about 1 ms for the 10-30k characters of these specs; 1 s allows
# for a slow, loaded machine and is still 9× below the fastest the old parser took (9 s).
SPEC_S = 1.0


def test_the_10000_space_spec_of_the_issue(store):
    """`--keys "k<10,000 spaces>!"` hung the old parser (cubic: 1,000 spaces took 1.3 s)."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        parse_view("k" + " " * 10_000 + "!", "keys")
    assert time.perf_counter() - t0 < SPEC_S and e.value.field == "keys"
    # a valid spec padded with as many spaces still parses, to the same view
    pad = " " * 10_000
    v = parse_view(f"{pad}a/b{pad}[ 1 ,{pad}2:5 , ::2, @ cols ]{pad}/{pad}255{pad}", "keys")
    assert (v.array, v.scale) == ("a/b", 1 / 255)
    assert v.columns == (1, slice(2, 5), slice(None, None, 2), "cols")
    assert time.perf_counter() - t0 < SPEC_S
    # a valid spec naming what the store lacks is a DataError
    for spec in ("nosuch", "pixels[@nosuch]", "a/b[0]"):
        with pytest.raises(DataError, match="no array"):
            open_source(store, keys=spec + pad)


# More hostile specs (each hung the old parser for 9 s to minutes, or crashed it): runs of
# spaces or digits where its regex backtracked, integers longer than int() converts.
LONG_SPECS = ["k" * 5000 + " " * 5000 + "!",
              "pixels" + " " * 10_000 + "[0]" + " " * 10_000 + "/" + " " * 10_000 + "x",
              "pixels[@cols]" + " " * 30_000 + "x", "pixels[0:" + "1" * 5000 + "]",
              "pixels[" + "7" * 5000 + "]", "pixels/1" + "2" * 10_000 + "a"]


@pytest.mark.parametrize("spec", LONG_SPECS, ids=range(len(LONG_SPECS)))
def test_hostile_view_specs_fail_fast_with_a_config_error(spec):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        parse_view(spec, "keys")
    assert time.perf_counter() - t0 < SPEC_S
    assert e.value.field == "keys"


def test_huge_row_numbers_are_a_config_error(store):
    with pytest.raises(ConfigError) as e:  # was: ValueError (int() of over 4,300 digits)
        open_source(store, rows="0:" + "9" * 5000)
    assert e.value.field == "rows"


_SPEC_PARTS = st.sampled_from(
    ["pixels", "cols", "labels", "nosuch", "a/b", "[", "]", ",", ":", "::", "@", "/", "*", "0",
     "3", "-1", "255", "1e3", "1e999", ".5", "+", " ", "\t", " " * 800, "9" * 5000, "é", "!"])
_PAD = st.sampled_from(["", " ", "\t ", " " * 800])  # 800 spaces: 0.5 s for the old parser
# NAME PAD [COLUMNS] PAD SCALE PAD TAIL, each part valid or not
_SHAPED_SPEC = st.tuples(
    st.sampled_from(["pixels", "nosuch", "a/b", "k", "", "9"]), _PAD,
    st.sampled_from(["", "[0]", "[@cols]", "[@nosuch]", "[1:4:2]", "[0:", "[9]", "[-1]", "[,]",
                     "[" + "9" * 5000 + "]"]), _PAD,
    st.sampled_from(["", "/", "/255", "*2", "/0", "*1e999", "/1" + "2" * 800]), _PAD,
    st.sampled_from(["", "!", "x", "[0]"])).map("".join)


@SETTINGS
@given(st.one_of(_SHAPED_SPEC, st.lists(_SPEC_PARTS, max_size=12).map("".join),
                 st.text(max_size=40)))
def test_any_view_spec_parses_or_fails_typed_and_fast(store, spec):
    """Parse, then open the store with it: either works, or a ConfigError (bad spec, column
    outside the array) or a DataError (an array the store does not hold)."""
    out = _typed_within_bound(lambda: parse_view(spec, "keys"))
    assert not isinstance(out, DataError)  # parsing alone knows nothing of a store
    if not isinstance(out, ConfigError):
        def open_():
            with open_source(store, keys=spec, values="pixels") as src:
                return src.key_dim
        _typed_within_bound(open_)


# ---- case 11: seed and classes --------------------------------------------------------------

def test_seed_is_bounded_by_what_prng_key_accepts():
    assert FitConfig(seed=MAX_SEED).seed == MAX_SEED  # 2⁶³-1: the largest int64
    for seed in (MAX_SEED + 1, 10**20):  # the old code took it, then OverflowError in PRNGKey
        with pytest.raises(ConfigError, match="at most") as e:
            FitConfig(seed=seed)
        assert e.value.field == "seed"


def test_seed_flag_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's usage error: exit 2 and one line
        cli.main(["fit", "x.zarr", "--seed", "100000000000000000000"])
    assert e.value.code == 2
    assert "seed=100000000000000000000: must be at most" in capsys.readouterr().err


def test_classes_beyond_the_bound_are_a_config_error(store):
    assert DataConfig(classes=MAX_CLASSES).classes == MAX_CLASSES
    with pytest.raises(ConfigError) as e:
        DataConfig(classes=10**12)
    assert e.value.field == "classes"
    # the Python path too: the old code opened it and failed with ArrayMemoryError at the read
    with pytest.raises(ConfigError) as e:
        LabelSource(store, None, "labels", classes=10**12)
    assert e.value.field == "classes"


@pytest.mark.parametrize("label", [MAX_CLASSES, 10**9, -1])
def test_a_label_out_of_range_is_a_data_error_naming_its_row(tmp_path, store, label):
    path = tmp_path / "big-label.zarr"
    labels = np.arange(50, dtype=np.int64) % 3
    labels[37] = label
    with StoreWriter(path, "zarr") as w:
        w.create_array("x", (50, 2), np.float32).append(np.ones((50, 2), np.float32))
        w.write_array("labels", labels)
        w.meta.update(rows=50, views={"keys": "x", "values": "x"})
    with pytest.raises(DataError, match=f"label {label} at row 37"):
        LabelSource(path, None, "labels")
    with LabelSource(store, None, "labels") as ok:  # labels 0 … 2: three classes
        assert ok.classes == 3


# ---- case 11: TOML files and a run's config.json --------------------------------------------

def _resolve_and_build(given: dict):
    cfg = cli.resolve(FIT, given)
    return [build(c, cfg) for c in (DataConfig, FitConfig, RunConfig)]


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not a valid TOML file") as e:
        cli.resolve(FIT, {"config": str(f)})
    assert e.value.field == "config"


_TOML_KEYS = st.sampled_from(["store", "keys", "values", "rows", "classes", "seed", "steps",
                              "prototypes", "learning-rate", "ridge", "values_are_labels",
                              "recipe", "resume", "unknown", "fit.seed"])
_TOML_VALUES = st.one_of(
    st.integers().map(str), st.floats().map(repr),
    st.booleans().map(lambda b: str(b).lower()), st.text(max_size=20).map(json.dumps),
    st.lists(st.integers(-5, 10**20), max_size=3).map(json.dumps), st.just("{}"))
_TOML_DOCS = st.one_of(
    st.lists(st.tuples(_TOML_KEYS, _TOML_VALUES), max_size=4).map(
        lambda kv: "".join(f"{k} = {v}\n" for k, v in kv).encode()),
    st.binary(max_size=40), st.text(max_size=40).map(str.encode))


@SETTINGS
@given(doc=_TOML_DOCS, table=st.booleans())
def test_any_toml_document_is_settings_or_a_typed_error(tmp_path_factory, doc, table):
    f = tmp_path_factory.getbasetemp() / "hyp.toml"
    f.write_bytes((b"[fit]\n" if table else b"") + doc)
    # a "resume" setting in it names a folder that holds no run: CheckpointError, by design
    _typed_within_bound(lambda: _resolve_and_build({"config": str(f), "store": "s.zarr"})
                        if b"resume" not in doc else None)


def _run_folder(path: Path, **edits) -> Path:
    """A run folder holding only the config.json a fit writes (all resume reads before a fit)."""
    record = {"format": RUN_FORMAT, "fingerprint": {"content_hash": "0" * 32},
              **DataConfig(store="/data/s.zarr").to_dict(), **FitConfig().to_dict(),
              **RunConfig(out=str(path)).to_dict(), **edits}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(record))
    return path


def test_an_edited_config_json_names_the_field_and_the_file(tmp_path, capsys):
    run = _run_folder(tmp_path / "run", store=5)
    with pytest.raises(ConfigError, match="config.json") as e:
        cli.resolve(FIT, {"resume": str(run)})
    assert e.value.field == "store"
    assert cli.main(["fit", "--resume", str(run)]) == 2  # one line, exit status 2
    assert f"store=5: in {run / 'config.json'}" in capsys.readouterr().err


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_FIELDS = {f.name: f for f in FIT.fields()}
_SESSION = {"resume", "overwrite", "json", "quiet", "config"}


@SETTINGS
@given(key=st.sampled_from(sorted(set(_FIELDS) - _SESSION)), value=_JSON)
def test_any_config_json_edit_is_checked_like_a_flag(tmp_path_factory, key, value):
    run = _run_folder(tmp_path_factory.getbasetemp() / "hyp-run", **{key: value})
    out = _typed_within_bound(lambda: cli.resolve(FIT, {"resume": str(run)}))
    try:
        check_value(key, value, _FIELDS[key].metadata)
    except ConfigError:  # a value a flag would refuse: refused at once, naming key and file
        assert isinstance(out, ConfigError) and out.field == key, out
        assert "config.json" in str(out)
        return
    assert not isinstance(out, Exception), out
    _typed_within_bound(lambda: [build(c, out) for c in (DataConfig, FitConfig, RunConfig)])


# ---- case 11: metrics.jsonl and sibling eval.json -------------------------------------------

def _metrics(tmp_path, *lines: bytes) -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(lines))
    return path


GOOD = [b'{"step": 0, "loss": 1.0}\n', b'{"step": 1, "loss": 0.5}\n']


@pytest.mark.parametrize("bad", [b"\xff\xfe\n", b'{"step": "x"}\n', b'{"step": -1}\n',
                                 b'{"step": true}\n', b"[" * 100_000 + b"\n"],
                         ids=["not-utf8", "step-x", "negative", "bool", "deep"])
def test_a_damaged_metrics_line_is_skipped_when_read_and_refused_by_truncate(tmp_path, bad):
    """Reading (plots, tools) skips it. Truncating (on resume) refuses: rewriting the file would
    silently delete the line, so the user is told which line to fix and the file is kept."""
    path = _metrics(tmp_path, GOOD[0], bad, GOOD[1])
    before = path.read_bytes()
    assert [r["step"] for r in read_metrics(path)] == [0, 1]
    with pytest.raises(CheckpointError, match=r"metrics.jsonl, line 2: not a metrics record"):
        truncate_metrics(path, 1)
    assert path.read_bytes() == before


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_failed_metrics_append_is_a_checkpoint_error_naming_the_file():
    class Report:  # a StepReport's fields that MetricsWriter reads
        step, loss, rmse, seconds, rows = 4, 0.5, 0.25, 1.0, 100

    with MetricsWriter("/dev/full") as w:  # every write: OSError ENOSPC, a full disk
        with pytest.raises(CheckpointError, match="/dev/full: cannot append the record of step "
                           "4") as e:
            w(Report())
        assert e.value.step == 4 and e.value.__cause__.errno == 28  # ENOSPC
    # leaving the block closed the file without a second error (nothing was left buffered)


def test_eval_plots_skip_malformed_sibling_eval_files(tmp_path):
    pytest.importorskip("matplotlib")
    from scalemem._run.plots import eval_plots

    res = {"store": "/s.zarr", "split": "test", "keys": "k", "values": "v", "prototypes": 8,
           "rmse": 0.3}
    siblings = {"null-rmse": json.dumps({**res, "rmse": None}).encode(),
                "text-p": json.dumps({**res, "prototypes": "x"}).encode(),
                "list": b"[1, 2]", "not-utf8": b"\xff\xfe", "good": json.dumps(
                    {**res, "prototypes": 4, "rmse": 0.4}).encode(),
                "other-split": json.dumps({**res, "split": "fit", "rmse": None}).encode()}
    for name, data in siblings.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_bytes(data)
    (tmp_path / "run").mkdir()

    class Source:
        value_dim = 16  # not a 28×28 image: no prediction grid, so no model is needed

    notes: list[str] = []
    out = eval_plots(tmp_path / "run", None, {"metrics": {"rmse": [0.5, None]}}, Source(), res,
                     False, say=notes.append)
    assert [Path(p).name for p in out] == ["rmse_vs_prototypes.png"]
    skipped = sorted(Path(n.split(":")[0]).parent.name for n in notes if "eval.json" in n)
    assert skipped == ["list", "not-utf8", "null-rmse", "text-p"]
    assert any("loss curve is skipped" in n for n in notes)
