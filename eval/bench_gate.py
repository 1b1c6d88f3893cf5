"""Where the gate + selection time goes (GPU): each step of SeerAttention's block selection timed alone.

One layer of a Llama-3.1-8B-shaped model (32 query / 8 KV heads, D 128, bf16, block 64, per-query-head gate,
d_gate 128), at each length: pooling q and k, the whole gate with its block-score matmul in float32 or bf16,
TopK selection, the compact block lists that the sparse kernel loops over, and everything together.
Milliseconds are per layer (mean device time: calls queued back to back, one synchronization at the end,
so host dispatch overhead is not counted); the last column multiplies by 32 layers.

    python eval/bench_gate.py --lengths 32768,131072 --json OUT/gate.json

`--grains 4x4,8x8` also times the whole gate (and gate + selection + lists) at finer scoring grains: query × key
sub-blocks per block (`GateConfig.q_sub_blocks`, `k_sub_blocks`), against whole blocks (1x1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime

import jax
import jax.numpy as jnp
import numpy as np
from seerjax.eval.timing import pipelined_ms, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--gate-heads", default="query", choices=("query", "kv"))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--grains", default="", help="comma-separated QxK sub-block grains timed besides 1x1, e.g. 4x4,8x8")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from flax import nnx
    from seerjax.kernels.block_sparse import compact_block_lists
    from seerjax.kernels.topk import kth_largest

    from seerjax.config import RopeConfig
    from seerjax.gate import AttnGate, GateConfig, GateConfigError, parse_grain, pool_blocks
    from seerjax.rope import apply_rope, rope_frequencies
    from seerjax.selection import SelectionConfig, row_k, select_blocks

    layers, hq, hkv, d, bs = 32, 32, 8, 128, 64
    gcfg = GateConfig(num_layers=1, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, d_gate=128,
                      heads=args.gate_heads)
    gate = AttnGate(gcfg, rngs=nnx.Rngs(0))
    inv, sc = rope_frequencies(RopeConfig(theta=500000.0), gcfg.d_gate)

    def rope(x, pos):
        return apply_rope(x, pos, inv, sc)

    try:
        grains = [parse_grain(g) for g in args.grains.split(",") if g]
        fine_gates = {g: AttnGate(dataclasses.replace(gcfg, q_sub_blocks=g[0], k_sub_blocks=g[1]), rngs=nnx.Rngs(0)) for g in grains}
    except GateConfigError as e:
        p.error(f"--grains must be like 4x4,8x8 with sub-blocks dividing {bs}: {e}")
    sel = SelectionConfig(density=args.density)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}, {datetime.date.today()}")
    rows = []
    for t in [int(x) for x in args.lengths.split(",")]:
        q = jax.random.normal(jax.random.key(1), (1, t, hq, d), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(2), (1, t, hkv, d), jnp.bfloat16)
        n = -(-t // bs)
        logits = jax.jit(lambda q, k: gate(q, k, rope=rope))(q, k)
        kk = row_k(args.density, n, n)  # the selection's per-row budgets
        if not isinstance(kk, int):
            kk = np.broadcast_to(kk, logits.shape[:-1])
        mask = jax.jit(lambda s: select_blocks(s, sel))(logits)
        full = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
        steps = {
            "pool q (avg)": (jax.jit(lambda q: pool_blocks(q, bs, gcfg.q_pooling)), (q,)),
            "pool k (max,min,avg)": (jax.jit(lambda k: pool_blocks(k, bs, gcfg.k_pooling)), (k,)),
            "gate, f32 scores": (jax.jit(lambda q, k: gate(q, k, rope=rope, score_dtype=jnp.float32)), (q, k)),
            "gate, bf16 scores": (jax.jit(lambda q, k: gate(q, k, rope=rope)), (q, k)),
            "k-th value (Pallas)": (jax.jit(lambda s, kk=kk: kth_largest(s, kk)), (logits,)),
            "select_blocks (premasked)": (jax.jit(lambda s: select_blocks(s, sel, premasked=True)), (logits,)),
            "compact block lists": (jax.jit(lambda m, full=full: compact_block_lists(m, full[None, None])), (mask,)),
            "gate + select": (jax.jit(lambda q, k: select_blocks(gate(q, k, rope=rope), sel, premasked=True)), (q, k)),
            "gate + select + lists": (
                jax.jit(lambda q, k, full=full: compact_block_lists(select_blocks(gate(q, k, rope=rope), sel, premasked=True), full[None, None])),
                (q, k),
            ),
        }
        for (gq, gk), fg in fine_gates.items():
            steps[f"gate {gq}x{gk} sub-blocks, bf16 scores"] = (jax.jit(lambda q, k, fg=fg: fg(q, k, rope=rope)), (q, k))
            steps[f"gate {gq}x{gk} + select + lists"] = (
                jax.jit(lambda q, k, fg=fg, full=full: compact_block_lists(select_blocks(fg(q, k, rope=rope), sel, premasked=True), full[None, None])),
                (q, k),
            )
        for name, (fn, fargs) in steps.items():
            ms = pipelined_ms(fn, *fargs, warmup=2, reps=args.reps)
            rows.append({"T": t, "step": name, "ms_per_layer": ms, "ms_all_layers": ms * layers})
        del q, k, logits, mask

    print("\n| T | step | ms per layer | ms × 32 layers |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['step']} | {r['ms_per_layer']:.3f} | {r['ms_all_layers']:.1f} |")
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
