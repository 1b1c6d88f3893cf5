"""Temporary: the pooled forward (lax.map chunks) against cuDNN at one length, per row-max budget, rounds."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
from timing import median_ms
from seerjax.kernels import hopper
from seerjax.kernels.checks import check_attention_inputs
import tune_kernels as tk

T = int(sys.argv[1]); launches = sys.argv[2].split(","); budgets = [int(x) for x in sys.argv[3].split(",")]
rounds = int(sys.argv[4]); rows = []
q = jax.random.normal(jax.random.key(0), (1, T, 32, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (1, T, 8, 128), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (1, T, 8, 128), jnp.bfloat16)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
fns = {(text, b): jax.jit(lambda q, k, v, l=l, b=b: hopper.attention_with_pooling_hopper(
    q, k, v, sh, launch=l, rowmax_budget=b * 2**20)) for text, l in zip(launches, tk.parse_launches(sys.argv[2]))
    for b in budgets}
for r in range(rounds):
    c = median_ms(cud, q, k, v, warmup=2, reps=5)
    print(f"round {r} cudnn {c:.3f}", flush=True)
    for (text, b), fn in fns.items():
        ms = median_ms(fn, q, k, v, warmup=2, reps=5)
        rows.append({"round": r, "launch": text, "budget_mib": b, "ms": ms, "cudnn_ms": c, "vs_cudnn": ms / c})
        print(f"round {r} {text} budget {b} MiB: {ms:.3f} ms = {ms / c:.3f}x cuDNN", flush=True)
json.dump(rows, open(sys.argv[5], "w"), indent=1)
