"""Tile sweep for the block-sparse forward kernel (GPU): which launch shape is fastest, per mask kind.

    python eval/tune_block_sparse.py --length 32768 --densities 0.1,1.0 --json OUT/tune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--densities", default="0.1,1.0")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from seerjax.eval.bench_kernels import random_mask
    from seerjax.eval.timing import median_ms
    from seerjax.kernels.block_sparse import Tiles, block_sparse_attention_pallas, default_tiling
    from seerjax.kernels.checks import check_attention_inputs

    t, hq, hkv, d, bs = args.length, 32, 8, 128, 64
    q = jax.random.normal(jax.random.key(0), (1, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (1, t, hkv, d), jnp.bfloat16)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=bs, sm_scale=None, lengths=None)
    rows = []
    for mask_heads, dens in itertools.product((hq, hkv), [float(x) for x in args.densities.split(",")]):
        mask = random_mask(jax.random.key(3), 1, mask_heads, t // bs, t // bs, dens)
        base = default_tiling(shape, mask_heads, jnp.bfloat16)
        heads_options = (1, 2, 4) if mask_heads == hkv else (1,)
        for heads, q_rows, warps, stages in itertools.product(heads_options, (32, 64), (4, 8), (2, 3, 4)):
            tiles = Tiles(q_rows=q_rows, heads=heads, kv_rows=64, warps=warps, stages=stages)
            tiling = dataclasses.replace(base, fwd=tiles)
            fn = jax.jit(lambda q, k, v, m, tiling=tiling: block_sparse_attention_pallas(
                q, k, v, m, shape, interpret=False, tiling=tiling))
            try:
                ms = median_ms(fn, q, k, v, mask, warmup=2, reps=5)
            except Exception as e:  # a launch shape that does not compile (shared memory, registers)
                ms = float("nan")
                print(f"  {tiles}: {type(e).__name__}: {str(e)[:120]}")
            default = tiles == base.fwd
            rows.append(dict(mask="query" if mask_heads == hq else "kv", density=dens, ms=ms, default=default,
                             **dataclasses.asdict(tiles)))
            print(f"{rows[-1]['mask']:5s} d={dens:<4} heads={heads} q_rows={q_rows} warps={warps} stages={stages}: "
                  f"{ms:.3f} ms{'  (default)' if default else ''}", flush=True)
    for (mask, dens), group in itertools.groupby(rows, key=lambda r: (r["mask"], r["density"])):
        group = [r for r in group if r["ms"] == r["ms"]]
        best = min(group, key=lambda r: r["ms"])
        dflt = [r for r in group if r["default"]]
        print(f"best {mask} d={dens}: {best['ms']:.3f} ms heads={best['heads']} q_rows={best['q_rows']} "
              f"warps={best['warps']} stages={best['stages']}; default {dflt[0]['ms'] if dflt else float('nan'):.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
