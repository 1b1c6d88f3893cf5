"""Fine-tuning benchmark (GPU): tokens/s of one training step, sparse (seer) vs dense attention, on a mesh.

A model of a real preset's sizes with random weights (float32 parameters and AdamW state, bfloat16 compute) and
random gates (per query head, d_gate 128, block 64) is created directly sharded on the mesh; each setting
compiles the real fine-tuning step of `seerjax.train.finetune` (LM loss through block-sparse attention with the
gate loss on the pooled map, or the dense baseline) and times it on random tokens.

    python eval/bench_finetune.py --preset llama-1b --mesh fsdp=8 --seq-len 32768 --batch 8 \
        --attention seer,dense --densities 0.1,0.5 --json OUT/finetune.json

Prints a table (step time, tokens/s, tokens/s per device, peak memory per device) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {
    "tiny": dict(
        model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
    ),
    "llama-1b": dict(  # Llama 3.2 1B
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-3b": dict(  # Llama 3.2 3B
        model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=True,
    ),
    "llama-8b": dict(  # Llama 3.1 8B, pretraining context
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False,
    ),
}


def init_sharded(abstract_state, shardings, seed: int):
    """Random weights made directly in their shardings: normal (std 0.02) weights, unit norms, zero biases."""
    from flax import nnx

    flat = nnx.to_flat_state(abstract_state)
    sh_flat = dict(nnx.to_flat_state(shardings))
    keys = jax.random.split(jax.random.key(seed), len(flat))
    values = []
    for key, (path, var) in zip(keys, flat, strict=True):
        name = "/".join(str(p) for p in path)
        kind = "ones" if "norm" in name else "zeros" if "bias" in name else "normal"
        shape, dtype = var.shape, jnp.dtype(var.dtype)

        def make(k, shape=shape, dtype=dtype, kind=kind):
            if kind == "normal":
                return (jax.random.normal(k, shape, jnp.float32) * 0.02).astype(dtype)
            return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

        values.append((path, var.replace(jax.jit(make, out_shardings=sh_flat[path].get_value())(key))))
    return nnx.from_flat_state(values)


def _peak_gb() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller runs)")
    p.add_argument("--mesh", default=None, help="e.g. fsdp=8 or data=2,fsdp=4 (default: one device)")
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--batch", type=int, default=None, help="global batch (default: data×fsdp, one per shard)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--attention", default="seer,dense", help="comma-separated: seer, dense")
    p.add_argument("--densities", default="0.1,0.5", help="densities of the seer runs")
    p.add_argument("--remat", default="full")
    p.add_argument("--yarn-factor", type=float, default=None, help="re-configure RoPE with YaRN by this factor")
    p.add_argument("--gate-loss-scale", type=float, default=10.0, help="0 skips the pooled target")
    p.add_argument("--loss-chunk", type=int, default=2048)
    p.add_argument("--implementation", default=None)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one compile step)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from flax import nnx

    from seerjax import sharding as shd
    from seerjax.config import ModelConfig
    from seerjax.gate import GateParam
    from seerjax.gates_io import gate_config_for_model
    from seerjax.train import finetune as ft

    shd.maybe_initialize_distributed()
    mesh = shd.make_mesh(args.mesh)
    hf = dict(PRESETS[args.preset])
    if args.layers:
        hf["num_hidden_layers"] = args.layers
    config = ModelConfig.from_hf_dict(hf)
    if args.yarn_factor:
        config = ft.yarn_config(config, args.yarn_factor)
    head_dim = config.head_dim
    gate_config = gate_config_for_model(config, block_size=64, d_gate=128 if head_dim >= 64 else head_dim)
    batch = args.batch or shd.batch_divisor(mesh)
    shd.check_batch(batch, mesh)

    abstract = ft.abstract_model(config, gate_config, jnp.bfloat16)
    state = nnx.state(abstract)
    model = nnx.merge(nnx.graphdef(abstract), init_sharded(state, shd.tree_shardings(state, mesh), seed=0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_gate = sum(x.size for x in jax.tree.leaves(nnx.state(model, GateParam)))

    dev = jax.devices()[0]
    print(
        f"device {dev.device_kind} × {mesh.size} (mesh {shd.describe(mesh)}), jax {jax.__version__}, "
        f"{datetime.date.today()}; preset {args.preset} ({config.num_layers} layers, {n_params / 1e9:.2f}B params "
        f"incl. {n_gate / 1e6:.1f}M gate), seq {args.seq_len}, global batch {batch} × accum {args.grad_accum}, "
        f"remat {args.remat}"
    )
    # Float32 parameters, AdamW's two moments and the gradients: 16 bytes per parameter, split over fsdp × tensor.
    state_gb = 16 * n_params / 1e9
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    print(f"training state (params + AdamW moments + grads, float32): {state_gb:.1f} GB in all, "
          f"{state_gb / max(1, mesh.size // mesh.shape.get('data', 1)):.1f} GB per device"
          + ("" if limit is None else f"; device memory {limit / 1e9:.1f} GB"), flush=True)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.grad_accum, batch, args.seq_len), dtype=np.int32)
    tokens = shd.put_batch(tokens, mesh, batch_dim=1)
    settings = [("dense", 1.0)] if "dense" in args.attention.split(",") else []
    settings = [("seer", float(d)) for d in args.densities.split(",") if "seer" in args.attention.split(",")] + settings
    records = []
    header = "| attention | density | step ms | tokens/s | tokens/s/device | achieved density | peak GiB/device |"
    print(header)
    print("|" + "---|" * 7)
    for attention, density in settings:
        s = ft.FinetuneSettings(
            model="bench", gates="bench", data="random", seq_len=args.seq_len, steps=1000, out="unused", batch=batch,
            grad_accum=args.grad_accum, density=density, attention=attention, dtype="bfloat16",
            implementation=args.implementation, remat=args.remat, gate_loss_scale=args.gate_loss_scale,
            loss_chunk=args.loss_chunk, mesh=args.mesh, warmup=10, progress=False,
        )
        st = ft.setup(model, s, mesh)
        print(f"  {attention} {density}: compiling and running the first step ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        st.trainable, st.opt_state, metrics = st.step_fn(st.trainable, st.opt_state, st.rest, tokens)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        print(f"  first step (compile included) {compile_s:.1f} s", file=sys.stderr, flush=True)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            st.trainable, st.opt_state, metrics = st.step_fn(st.trainable, st.opt_state, st.rest, tokens)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        nnx.update(model, st.trainable["gates"], st.trainable["params"])  # donated: keep the live arrays
        step_s = statistics.median(times)
        tok_s = args.grad_accum * batch * args.seq_len / step_s
        rec = {
            "attention": attention, "density": density, "achieved_density": float(metrics["density"]),
            "step_ms": step_s * 1e3, "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / mesh.size,
            "compile_s": compile_s, "loss": float(metrics["loss"]), "peak_gib_per_device": _peak_gb(),
        }
        records.append(rec)
        peak = "" if rec["peak_gib_per_device"] is None else f"{rec['peak_gib_per_device']:.1f}"
        print(f"| {attention} | {density} | {rec['step_ms']:.1f} | {tok_s:,.0f} | {tok_s / mesh.size:,.0f} | "
              f"{rec['achieved_density']:.3f} | {peak} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "device": dev.device_kind, "devices": mesh.size, "mesh": shd.describe(mesh), "jax": jax.__version__,
                "date": str(datetime.date.today()), "preset": args.preset, "layers": config.num_layers,
                "params": int(n_params), "seq_len": args.seq_len, "batch": batch, "grad_accum": args.grad_accum,
                "remat": args.remat, "records": records,
            }, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
