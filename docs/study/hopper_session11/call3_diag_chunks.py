"""Temporary: the pooled forward at 128k, 8 KV heads: chunking vs one call, against per-head calls."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
from timing import median_ms
from seerjax.kernels import hopper
from seerjax.kernels.checks import check_attention_inputs
import tune_kernels as tk

T = int(sys.argv[1]); launch = tk.parse_launches(sys.argv[2])[0]; rows = []
q = jax.random.normal(jax.random.key(0), (1, T, 32, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (1, T, 8, 128), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (1, T, 8, 128), jnp.bfloat16)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
def t(name, fn, *args, reps=5):
    try:
        ms = median_ms(fn, *args, warmup=2, reps=reps)
    except Exception as e:
        print(f"{name}: {type(e).__name__} {str(e)[:200]}", flush=True); return
    rows.append({"what": name, "ms": ms}); print(f"{name}: {ms:.3f} ms", flush=True)
t("cudnn", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")), q, k, v)
for budget in (4, 16):
    t(f"pooled budget {budget} GiB", jax.jit(lambda q, k, v, b=budget: hopper.attention_with_pooling_hopper(
        q, k, v, sh, launch=launch, rowmax_budget=b * 2**30)), q, k, v)
sh1 = check_attention_inputs(q[:, :, :4], k[:, :, :1], v[:, :, :1], causal=True, block_size=64, sm_scale=None, lengths=None)
one = jax.jit(lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, sh1, launch=launch))
qs = [q[:, :, 4 * g:4 * g + 4] for g in range(8)]; ks = [k[:, :, g:g + 1] for g in range(8)]; vs = [v[:, :, g:g + 1] for g in range(8)]
t("one head", one, qs[0], ks[0], vs[0])
t("8 per-head calls (python loop)", lambda: [one(a, b, c) for a, b, c in zip(qs, ks, vs)])
every = jnp.ones((1, 8, sh.nq, sh.nk), bool)
plan = hopper.make_hopper_plan(sh, 8, False, emit_stats=True, **launch)
def kern(q, k, v):
    out, rm, lse = hopper._forward_call(plan, *hopper._prepare(q, k, v, every, None, sh, None))
    return out, rm[0, 0, 0, :8], lse
t("kernel-only 8 heads one call", jax.jit(kern), q, k, v, reps=3)
plain = {a: b for a, b in launch.items() if a != "rowmax_batch"}
t("plain 8 heads", jax.jit(lambda q, k, v, m: hopper.block_sparse_attention_hopper(q, k, v, m, sh, **plain)), q, k, v, every)
json.dump(rows, open(sys.argv[3], "w"), indent=1)
