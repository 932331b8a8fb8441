"""The one engine's streamed path as ``fit_data`` builds it, but with the read-ahead depth
asked for (for ``memory_scaling.py`` and ``stream_throughput.py``)."""

from __future__ import annotations


def streamed_engine(source, prototypes: int, *, chunk_rows: int, chunks_per_block: int,
                    prefetch: int, steps: int = 1):
    """``(config, engine, K0)``: a one-device ``StreamedEngine`` over ``source`` with the seed
    recipe, and ``K₀ = 0.01·normal`` replicated over its mesh as the engine's own outputs are
    (so step 1 runs the programs step 0 compiled). Call inside ``jax.enable_x64(True)``."""
    import jax.numpy as jnp

    from scalemem import FitConfig
    from scalemem._engine.engines import StreamedEngine
    from scalemem._engine.fitting import build_engine
    from scalemem._engine.init import normal_keys
    from scalemem._engine.mesh import replicate

    cfg = FitConfig(prototypes=prototypes, recipe="seed", steps=steps, residency="streamed",
                    devices=1, chunk_rows=chunk_rows, chunks_per_block=chunks_per_block)
    spec = build_engine(source, cfg).spec  # the programs' spec: mesh, optimiser, scales, …
    engine = StreamedEngine(source, spec, ridge=cfg.ridge, chunk_rows=chunk_rows,
                            chunks_per_block=chunks_per_block, dtype=jnp.float32,
                            prefetch=prefetch)
    K0 = replicate(normal_keys(prototypes, source.key_dim, 0, jnp.float32), spec.mesh)
    return cfg, engine, K0
