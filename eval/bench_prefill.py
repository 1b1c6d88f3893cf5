"""Prefill benchmark (GPU): time to first token of a Llama-3.1-8B-shaped model, dense vs SeerAttention.

The forward runs over the whole prompt and produces the last position's logits only, as a server does.
Random bf16 weights with the real config's sizes; random gates (per query head, d_gate 128, block 64), whose
scores pick blocks by TopK at each density. Gate + selection time is also measured apart (one layer's gate
and TopK on that layer's q/k shapes, times the number of layers).

    python eval/bench_prefill.py --lengths 32768,65536,131072 --densities 0.5,0.1 --json OUT/prefill.json
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
from seerjax.eval.timing import median_ms, pipelined_ms, write_json

LLAMA31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
    rope_theta=500000.0, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def llama8b_with_gates(layers: int | None = None, gate_heads: str = "query", grain: tuple[int, int] = (1, 1)):
    """(config, model, gate config): a Llama-3.1-8B-shaped model (optionally fewer layers) with random bf16
    weights made on the device and random AttnGates attached (d_gate 128, block 64)."""
    from seerjax.config import ModelConfig
    from seerjax.gates_io import attach_gates, gate_config_for_model
    from seerjax.model import random_model

    hf = dict(LLAMA31_8B)
    if layers:
        hf["num_hidden_layers"] = layers
    cfg = ModelConfig.from_hf_dict(hf)
    model = random_model(cfg, dtype=jnp.bfloat16)
    gate_cfg = gate_config_for_model(cfg, block_size=64, d_gate=128, heads=gate_heads, q_sub_blocks=grain[0], k_sub_blocks=grain[1])
    attach_gates(model, gate_cfg)
    return cfg, model, gate_cfg


def _dense_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="32768,65536,131072")
    p.add_argument("--densities", default="0.5,0.1")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller runs)")
    p.add_argument("--gate-heads", default="query", choices=("query", "kv"))
    p.add_argument("--grain", default="1x1", help="the gate's query x key sub-blocks per block (seerjax.gate), e.g. 8x8")
    p.add_argument("--implementation", default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from flax import nnx

    from seerjax.selection import SelectionConfig, select_blocks

    from seerjax.gate import GateConfigError, parse_grain

    try:
        grain = parse_grain(args.grain)
    except GateConfigError as e:
        p.error(f"--grain: {e}")
    cfg, model, gate_cfg = llama8b_with_gates(args.layers, args.gate_heads, grain)
    graphdef, state = nnx.split(model)

    def make(attention, options):
        @jax.jit
        def ttft(state, ids):
            m = nnx.merge(graphdef, state)
            logits = m.forward(ids, attention=attention, attention_config=options, return_aux=False, last_only=True)
            return logits

        return ttft

    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}, {datetime.date.today()}, {cfg.num_layers} layers")
    rows = []
    for t in [int(x) for x in args.lengths.split(",")]:
        ids = jax.random.randint(jax.random.key(t), (1, t), 0, cfg.vocab_size)
        ms_dense = median_ms(make("cudnn", {}), state, ids, warmup=1, reps=args.reps)
        rows.append(dict(T=t, method="dense (cuDNN)", density=1.0, ms=ms_dense, speedup=1.0))
        # Dense attention alone (one layer's cuDNN call on the same shapes, times the layers): the yardstick
        # for the gate + selection overhead.
        qa = jax.random.normal(jax.random.key(3), (1, t, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
        ka = jax.random.normal(jax.random.key(4), (1, t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
        ms_attn_dense = median_ms(jax.jit(_dense_attention), qa, ka, ka, warmup=1, reps=args.reps) * cfg.num_layers
        del qa, ka
        # Gate + selection alone, on one layer's shapes, times the layers.
        gate = model.layers[0].attn.gate
        qn = jax.random.normal(jax.random.key(1), (1, t, cfg.num_heads, cfg.head_dim), jnp.bfloat16)
        kn = jax.random.normal(jax.random.key(2), (1, t, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)
        from seerjax.rope import apply_rope, rope_frequencies

        inv, sc = rope_frequencies(cfg.rope, gate_cfg.d_gate)
        for dens in [float(x) for x in args.densities.split(",")]:
            ms = median_ms(make("seer", {"density": dens, "implementation": args.implementation}), state, ids, warmup=1, reps=args.reps)

            def gate_only(qn, kn):
                return gate(qn, kn, rope=lambda x, pos: apply_rope(x, pos, inv, sc))

            @jax.jit
            def gate_select(qn, kn):
                # As the seer path: the gate's masked logits go to TopK as they are.
                return select_blocks(gate_only(qn, kn), SelectionConfig(density=dens), premasked=True)

            # Sub-millisecond calls: queued back to back, so host dispatch is not counted (pipelined_ms).
            ms_gate_select = pipelined_ms(gate_select, qn, kn, warmup=2, reps=30) * cfg.num_layers
            ms_gate = pipelined_ms(jax.jit(gate_only), qn, kn, warmup=2, reps=30) * cfg.num_layers
            rows.append(dict(T=t, method="seer", density=dens, ms=ms, speedup=ms_dense / ms,
                             gate_select_ms=ms_gate_select, gate_ms=ms_gate,
                             dense_attention_ms=ms_attn_dense))
        del ids, qn, kn

    print("\n| T | method | density | TTFT ms | speedup | gate+select ms (all layers) | of which gate | % of dense attention |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = f"{r['gate_select_ms']:.1f}" if "gate_select_ms" in r else ""
        gg = f"{r['gate_ms']:.1f}" if "gate_ms" in r else ""
        pct = f"{100 * r['gate_select_ms'] / r['dense_attention_ms']:.1f}%" if "gate_select_ms" in r else ""
        print(f"| {r['T']} | {r['method']} | {r['density']} | {r['ms']:.1f} | {r['speedup']:.2f}× | {g} | {gg} | {pct} |")
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
