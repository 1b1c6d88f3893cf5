"""Temporary: where the pooled forward's time goes at one length (one GQA group = one chunk at 128k)."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
from timing import median_ms
from seerjax.kernels import hopper, pooling
from seerjax.kernels.checks import check_attention_inputs

T = int(sys.argv[1]); kvh = int(sys.argv[2]); launches = sys.argv[3].split(",")
sys.path.insert(0, "eval")
import tune_kernels as tk
q = jax.random.normal(jax.random.key(0), (1, T, 4 * kvh, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (1, T, kvh, 128), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (1, T, kvh, 128), jnp.bfloat16)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
rows = []
def t(name, fn, *args):
    ms = median_ms(jax.jit(fn), *args, warmup=2, reps=5)
    rows.append({"what": name, "ms": ms}); print(f"{name}: {ms:.3f} ms", flush=True)
cud = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
t("cudnn", cud, q, k, v)
every = jnp.ones((1, kvh, sh.nq, sh.nk), bool)
for text, launch in zip(launches, tk.parse_launches(sys.argv[3])):
    pooled_opts = {kk: vv for kk, vv in launch.items()}
    plain = {kk: vv for kk, vv in launch.items() if kk != "rowmax_batch"}
    t(f"plain {text}", lambda q, k, v, m: hopper.block_sparse_attention_hopper(q, k, v, m, sh, **plain), q, k, v, every)
    plan = hopper.make_hopper_plan(sh, kvh, False, emit_stats=True, **pooled_opts)
    def kern(q, k, v, plan=plan):
        out, rm, lse = hopper._forward_call(plan, *hopper._prepare(q, k, v, every, None, sh, None))
        return out, rm[0, 0, 0, :8], lse
    t(f"kernel-only {text}", kern, q, k, v)
    t(f"pooled {text}", lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, sh, launch=pooled_opts), q, k, v)
rm = jnp.zeros((1, 4 * kvh, sh.nk, sh.nq * 64), jnp.float32); lse = jnp.zeros((1, 4 * kvh, sh.nq * 64), jnp.float32)
tiles = pooling.Tiling(block_q=64, block_k=64, num_warps=4, num_stages=2)
t("epilogue", lambda rm, lse: pooling._pool_rowmax(rm, lse, None, sh, tiles), rm, lse)
json.dump(rows, open(sys.argv[4], "w"), indent=1)
