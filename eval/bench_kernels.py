"""Kernel benchmark (GPU): block-sparse and pooled attention against JAX's cuDNN dense attention.

Llama-3-8B attention shape by default (B 1, 32 query / 8 KV heads, D 128, bf16, causal). For each length:
cuDNN dense forward and forward+backward; `block_sparse_attention` at each density (random masks that keep
the diagonal, per query head or per KV head) forward and forward+backward; `attention_with_pooling`, its
one-pass and two-pass kernel paths each (`pooled (1-pass)`, `pooled (2-pass)`) with the Pallas kernel.
Times are device times after warm-up, on fresh random inputs (`--timing device`, the default): the median over
`--reps` rounds of the mean of a batch of calls queued back to back and synchronized once
(`timing.interleaved_ms`). The host's enqueue and synchronization, 0.3 ms or more per call on the GPU machine, are
then spread over a batch instead of added to every call. Each round times every call of a length, starting one
call further on each round, so a slow stretch of the power-capped GPU weighs on cuDNN and the kernels alike.
`--timing sync` takes single synchronized calls instead (what this script did, one kernel after another, until
the twelfth session); forward rows always carry that time too (`ms_sync` in the JSON, the `sync ms` column;
`rounds`: each round's device time). TFLOP/s count the work actually done (visible, selected query-key pairs;
backward = 2.5× forward).

    python eval/bench_kernels.py --lengths 8192,32768,131072 --densities 1.0,0.5,0.1 --json OUT/kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from seerjax.eval.timing import interleaved_ms, write_json


def random_mask(key, b, h, nq, nk, density):
    """Bool `[b, h, nq, nk]`: the diagonal plus random causal blocks at the TopK budget of `density`."""
    from seerjax.selection import SelectionConfig, select_blocks

    scores = jax.random.uniform(key, (b, h, nq, nk))
    return select_blocks(scores, SelectionConfig(density=density))


def visible_pairs(mask, t, s, bs, causal=True) -> float:
    """Query-key pairs inside selected blocks that the causal mask leaves visible, summed over heads."""
    m = np.asarray(mask).astype(np.int64)
    nq, nk = m.shape[-2:]
    rows = np.minimum(bs, t - np.arange(nq) * bs)
    cols = np.minimum(bs, s - np.arange(nk) * bs)
    full = rows[:, None] * cols[None, :]
    diag = np.arange(nk)[None, :] == np.arange(nq)[:, None] + (nk - nq)
    pairs = np.where(diag, rows[:, None] * (rows[:, None] + 1) // 2, full) if causal else full
    return float((m * pairs[None, None]).sum())


def pooled_variants(bs, implementation):
    """(row name, fn of q, k, v) for the pooled kernel: with the Pallas kernel, each path forced
    (1-pass: rowmax buffer, query heads chunked over its budget; 2-pass: `q kᵀ` twice); with any
    other implementation, the public entry point."""
    from seerjax.kernels import attention_with_pooling, default_implementation, pooling
    from seerjax.kernels.checks import check_attention_inputs

    name = implementation or default_implementation()
    if name not in ("pallas", "pallas_interpret"):
        return [("attention_with_pooling",
                 lambda q, k, v: attention_with_pooling(q, k, v, block_size=bs, implementation=name))]

    def forced(passes):
        def fn(q, k, v):
            shape = check_attention_inputs(q, k, v, causal=True, block_size=bs, sm_scale=None, lengths=None)
            return pooling.attention_with_pooling_pallas(
                q, k, v, shape, interpret=name == "pallas_interpret", passes=passes)
        return fn

    rows = [("pooled (1-pass)", forced(1)), ("pooled (2-pass)", forced(2))]
    if implementation is None and name == "pallas":
        from seerjax.kernels.hopper import is_hopper_device

        if is_hopper_device():  # what implementation=None runs there (Mosaic GPU where it was faster)
            rows.insert(0, ("pooled (default)", lambda q, k, v: attention_with_pooling(q, k, v, block_size=bs)))
    return rows


def _sparse(q, k, v, m, *, bs, implementation):
    from seerjax.kernels import block_sparse_attention

    return block_sparse_attention(q, k, v, m, block_size=bs, implementation=implementation)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,131072")
    p.add_argument("--densities", default="1.0,0.5,0.1")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--mask-heads", default="query", choices=("query", "kv"))
    p.add_argument("--implementation", default=None)
    p.add_argument("--backward", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--backward-max-len", type=int, default=32768, help="skip backward above this length")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--timing", default="device", choices=("device", "sync"),
                   help="device: batches of back-to-back calls, interleaved rounds (timing.interleaved_ms); sync: the "
                        "median of single synchronized calls in the same rounds")
    p.add_argument("--dense-implementation", default="cudnn", choices=("cudnn", "xla"),
                   help="the dense baseline's jax.nn.dot_product_attention implementation (xla: CPU smoke tests)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    # Several sparse implementations may be compared in one run (e.g. "pallas,hopper"); the pooled kernel
    # uses the first (the Hopper entry has no pooled kernel of its own: it means the portable one).
    impls = [x.strip() or None for x in args.implementation.split(",")] if args.implementation else [None]
    pooled_impl = "pallas" if impls[0] == "hopper" else impls[0]

    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")

    b, hq, hkv, d, bs = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size
    rows = []
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}, {datetime.date.today()}, timing {args.timing}")
    for t in [int(x) for x in args.lengths.split(",")]:
        key = jax.random.key(t)
        kq, kk, kv, km, kg = jax.random.split(key, 5)
        q = jax.random.normal(kq, (b, t, hq, d), jnp.bfloat16)
        k = jax.random.normal(kk, (b, t, hkv, d), jnp.bfloat16)
        v = jax.random.normal(kv, (b, t, hkv, d), jnp.bfloat16)
        do = jax.random.normal(kg, (b, t, hq, d), jnp.bfloat16)
        nq = -(-t // bs)
        dense_pairs = b * hq * t * (t + 1) / 2
        dense_flops = 4 * d * dense_pairs

        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=args.dense_implementation))
        do_bwd = args.backward and t <= args.backward_max_len
        # Every call of this length, then timed in interleaved rounds (timing.interleaved_ms).
        cases, specs = {}, []  # specs: (case, kernel, density, flops, forward case of a backward or None)
        cases["cudnn"] = (cudnn, (q, k, v))
        dense_label = f"{args.dense_implementation} dense"
        specs.append(("cudnn", dense_label, 1.0, dense_flops, None))
        if do_bwd:
            def dense_loss(q, k, v):
                return jnp.sum(cudnn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

            cases["cudnn+bwd"] = (jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2))), (q, k, v))
            specs.append(("cudnn+bwd", dense_label, 1.0, dense_flops, "cudnn"))
        for name, pooled in pooled_variants(bs, pooled_impl):
            cases[name] = (jax.jit(pooled), (q, k, v))
            specs.append((name, name, 1.0, dense_flops, None))
        for dens in [float(x) for x in args.densities.split(",") if x.strip()]:
            mask = random_mask(km, b, hq if args.mask_heads == "query" else hkv, nq, nq, dens)
            flops = 4 * d * visible_pairs(mask, t, t, bs) * (hq // mask.shape[1])
            for impl in impls:
                label = f"block_sparse ({args.mask_heads} masks)" + (f" [{impl}]" if len(impls) > 1 else "")
                fwd = f"{label} {dens}"
                cases[fwd] = (jax.jit(functools.partial(_sparse, bs=bs, implementation=impl)), (q, k, v, mask))
                specs.append((fwd, label, dens, flops, None))
                if do_bwd:
                    def sparse_loss(q, k, v, m, impl=impl):
                        out = _sparse(q, k, v, m, bs=bs, implementation=impl)
                        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

                    cases[fwd + "+bwd"] = (jax.jit(jax.grad(sparse_loss, argnums=(0, 1, 2))), (q, k, v, mask))
                    specs.append((fwd + "+bwd", label, dens, flops, fwd))
        timing = interleaved_ms(cases, reps=args.reps)
        key_ms = "ms" if args.timing == "device" else "ms_sync"
        dense_ms = {"fwd": timing["cudnn"][key_ms]}
        if do_bwd:
            dense_ms["bwd"] = timing["cudnn+bwd"][key_ms] - dense_ms["fwd"]
        for case, kernel, dens, flops, fwd_case in specs:
            tm = timing[case]
            if fwd_case is None:  # a forward: its time, and the synchronized one beside it
                row = dict(T=t, kernel=kernel, density=dens, pass_="fwd", ms=tm[key_ms], ms_sync=tm["ms_sync"],
                           rounds=tm["rounds"], tflops=flops / tm[key_ms] / 1e9)
            else:  # a backward: forward + backward, less the forward
                ms_b = tm[key_ms] - timing[fwd_case][key_ms]
                row = dict(T=t, kernel=kernel, density=dens, pass_="bwd", ms=ms_b, tflops=2.5 * flops / ms_b / 1e9)
            if kernel != dense_label:
                if dens == 1.0 and row["pass_"] == "fwd" and not kernel.startswith("block_sparse"):
                    row["vs_cudnn"] = row["ms"] / dense_ms["fwd"]
                else:
                    row["speedup"] = dense_ms[row["pass_"]] / row["ms"]
            rows.append(row)

        report(rows, args)  # after each length, so a run cut short keeps what it measured
    return 0


def report(rows, args) -> None:
    print(f"\n| T | kernel | density | pass | ms ({args.timing}) | sync ms | TFLOP/s | speedup vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r.get("speedup") or (1 / r["vs_cudnn"] if "vs_cudnn" in r else 1.0)
        sync = f"{r['ms_sync']:.3f}" if "ms_sync" in r else ""
        print(f"| {r['T']} | {r['kernel']} | {r['density']} | {r['pass_']} | {r['ms']:.3f} | {sync} | {r['tflops']:.0f} "
              f"| {sp:.2f}× |")
    sys.stdout.flush()
    write_json(args.json, args, rows)


if __name__ == "__main__":
    raise SystemExit(main())
