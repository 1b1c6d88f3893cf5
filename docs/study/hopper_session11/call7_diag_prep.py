"""Temporary: the sparse forward at 32k, density 0.1, KV masks: whole call vs its list preparation vs the kernel."""
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
from timing import median_ms
from bench_kernels import random_mask
from seerjax.kernels import hopper, block_sparse_attention
from seerjax.kernels.checks import check_attention_inputs

T = int(sys.argv[1]); dens = float(sys.argv[2]); rounds = int(sys.argv[3]); rows = []
q = jax.random.normal(jax.random.key(0), (1, T, 32, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (1, T, 8, 128), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (1, T, 8, 128), jnp.bfloat16)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
mask = random_mask(jax.random.key(3), 1, 8, T // 64, T // 64, dens)
plan = hopper.make_hopper_plan(sh, 8, False, **hopper.tuned_launch(sh, 8, hopper.sm_count()))
full = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, block_size=64, implementation="hopper"))
prep = jax.jit(lambda q, k, v, m: hopper._prepare(q, k, v, m, None, sh, None))
inputs = prep(q, k, v, mask)
kern = jax.jit(lambda *a: hopper._forward_call(plan, *a))
from seerjax.kernels.block_sparse import block_tables, compact_block_lists
tables = jax.jit(lambda m: block_tables(m, sh, None))
vis, fl = tables(mask)
lists = jax.jit(lambda a, b: compact_block_lists(a, b))
cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
for r in range(rounds):
    for name, fn, args in (("cudnn", cud, (q, k, v)), ("full call", full, (q, k, v, mask)), ("prepare", prep, (q, k, v, mask)),
                           ("kernel only", kern, inputs), ("block_tables", tables, (mask,)), ("lists+spans", lists, (vis, fl))):
        ms = median_ms(fn, *args, warmup=3, reps=20)
        rows.append({"round": r, "what": name, "ms": ms}); print(f"round {r} {name}: {ms:.4f} ms", flush=True)
json.dump(rows, open(sys.argv[4], "w"), indent=1)
