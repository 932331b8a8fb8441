"""Compile once: a second fit with the same shapes and settings in the same process traces and
compiles nothing (a grid search or a repeated fit pays compilation once)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest

import scalemem

_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def count_compiles():
    """Counts JAX's tracing and XLA compilation events while the block runs (a jit cache hit
    fires neither)."""
    seen = []

    def listener(name, duration, **kw):
        if name in _EVENTS:
            seen.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("settings", [
    dict(),  # the default recipe: k-means keys (a few exact passes), L-BFGS
    dict(recipe="adam"),  # k-means keys, cosine Adam
    dict(recipe="seed", steps=6, key_bias=True),
    dict(residency="streamed", chunk_rows=256, steps=4),
    dict(residency="streamed", one_pass=True, steps=4, chunk_rows=300, recipe="adam"),
], ids=["default", "adam", "seed-bias", "streamed", "one-pass"])
def test_second_fit_compiles_nothing(settings):
    rng = np.random.default_rng(0)
    Q = rng.standard_normal((1200, 5)).astype(np.float32)
    X = rng.standard_normal((1200, 4)).astype(np.float32)
    first = scalemem.fit(Q, X, 6, **{"steps": 5, **settings})
    scalemem.evaluate(first.memory, Q, X)
    Q2, X2 = Q + 1, X * 2  # other numbers, same shapes
    with count_compiles() as seen:
        second = scalemem.fit(Q2, X2, 6, **{"steps": 5, **settings})
        scalemem.evaluate(second.memory, Q2, X2)
    assert seen == [], f"{len(seen)} compilations on the second fit: {seen[:4]}"
    assert not np.array_equal(np.asarray(first.memory.K), np.asarray(second.memory.K))


def test_the_counter_sees_a_compilation():
    with count_compiles() as seen:
        jax.jit(lambda x: x * 3 + 1)(np.arange(7.0))
    assert seen
