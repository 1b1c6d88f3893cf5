"""Distillation step benchmark (GPU): one gate-distillation step of a Llama-3.1-8B-shaped model (random weights)
against a plain dense forward of the same model, time and peak memory.

    python eval/bench_distill.py --seq-len 32768 --json OUT/distill.json
"""

from __future__ import annotations

import argparse
import datetime
import json

import jax


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--gate-heads", default="query", choices=("query", "kv"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from flax import nnx

    from seerjax.eval.bench_prefill import llama8b_with_gates
    from seerjax.eval.timing import median_ms
    from seerjax.gate import GateParam
    from seerjax.train.distill import DistillSettings, make_optimizer, make_train_step

    cfg, model, gate_cfg = llama8b_with_gates(args.layers, args.gate_heads)
    graphdef, gates, frozen = nnx.split(model, GateParam, ...)
    s = DistillSettings(model="random", data="random", seq_len=args.seq_len, steps=10, out="/tmp/unused", progress=False)
    tx = make_optimizer(s)
    opt_state = tx.init(gates)
    step = make_train_step(graphdef, gate_cfg, tx, s)
    tokens = jax.random.randint(jax.random.key(0), (1, 1, args.seq_len), 0, cfg.vocab_size)

    gd_all, state_all = nnx.split(model)

    @jax.jit
    def dense_forward(state, ids):
        m = nnx.merge(gd_all, state)
        hidden, _ = m.hidden_states(ids, attention="cudnn")
        return hidden

    dev = jax.devices()[0]
    ms_dense = median_ms(dense_forward, state_all, tokens[0], reps=args.reps)
    mem_dense = dev.memory_stats().get("peak_bytes_in_use", 0)

    def run_step(gates, opt_state):
        return step(gates, opt_state, frozen, tokens)

    # The step donates gates and optimizer state: feed each call the previous call's outputs.
    carry = {"g": gates, "o": opt_state}

    def timed():
        carry["g"], carry["o"], loss = run_step(carry["g"], carry["o"])
        return loss

    ms_step = median_ms(timed, reps=args.reps)
    mem_step = dev.memory_stats().get("peak_bytes_in_use", 0)
    row = dict(seq_len=args.seq_len, layers=cfg.num_layers, dense_forward_ms=ms_dense, distill_step_ms=ms_step,
               ratio=ms_step / ms_dense, peak_gib_after_dense=mem_dense / 2**30, peak_gib_after_step=mem_step / 2**30,
               device=dev.device_kind, jax=jax.__version__, date=str(datetime.date.today()))
    print("| T | layers | dense forward ms | distill step ms | ratio | peak GiB (dense, then step) |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.seq_len} | {cfg.num_layers} | {ms_dense:.1f} | {ms_step:.1f} | {ms_step / ms_dense:.2f}× | "
          f"{mem_dense / 2**30:.1f}, {mem_step / 2**30:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
