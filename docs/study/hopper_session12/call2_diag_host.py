"""Throwaway (not committed): where the per-call synchronized time of the sparse forward goes."""
import os, sys, time, statistics, functools, json
import jax, jax.numpy as jnp
from seerjax.eval.timing import median_ms, pipelined_ms
from seerjax.eval.bench_kernels import random_mask, _sparse
from seerjax.kernels.checks import check_attention_inputs
from seerjax.kernels import hopper as H

t = int(sys.argv[1]); mode = sys.argv[2] if len(sys.argv) > 2 else "time"
key = jax.random.key(t); kq, kk, kv, km, kg = jax.random.split(key, 5)
q = jax.random.normal(kq, (1, t, 32, 128), jnp.bfloat16)
k = jax.random.normal(kk, (1, t, 8, 128), jnp.bfloat16)
v = jax.random.normal(kv, (1, t, 8, 128), jnp.bfloat16)
mask = random_mask(km, 1, 8, t // 64, t // 64, 0.1)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
plan = H.make_hopper_plan(sh, 8, False, **H.tuned_launch(sh, 8, 132))
x = jnp.ones((8,), jnp.float32)
triv = jax.jit(lambda x: x + 1)
prep = jax.jit(lambda m: H._prepare(q, k, v, m, None, sh, None)[:3])
lists, spans, valid = prep(mask)
kern = jax.jit(lambda l, s, va, q, k, v: H._forward_call(plan, l, s, va, q, k, v))
full = jax.jit(lambda q, k, v, m: H._forward_jit(q, k, v, m, None, plan))
disp = jax.jit(functools.partial(_sparse, bs=64, implementation=None))
cases = {"trivial": (triv, (x,)), "prep": (prep, (mask,)), "kernel": (kern, (lists, spans, valid, q, k, v)),
         "full": (full, (q, k, v, mask)), "dispatch": (disp, (q, k, v, mask))}
if mode == "ncu":
    for n in ("full", "full", "full"):
        f, a = cases[n]; jax.block_until_ready(f(*a))
    sys.exit(0)
for n, (f, a) in cases.items():
    jax.block_until_ready(f(*a))
res = {n: {"median": [], "pipelined": [], "enqueue_us": []} for n in cases}
for r in range(3):
    for n, (f, a) in cases.items():
        res[n]["median"].append(median_ms(f, *a, reps=20))
        res[n]["pipelined"].append(pipelined_ms(f, *a, reps=50))
        eq = []
        for _ in range(20):
            jax.block_until_ready(f(*a)); time.sleep(0.002)
            t0 = time.perf_counter(); o = f(*a); eq.append((time.perf_counter() - t0) * 1e6); jax.block_until_ready(o)
        res[n]["enqueue_us"].append(statistics.median(eq))
print(f"{'case':10s} {'median ms':>10s} {'pipelined ms':>12s} {'enqueue us':>10s}")
for n, d in res.items():
    print(f"{n:10s} {statistics.median(d['median']):10.4f} {statistics.median(d['pipelined']):12.4f} {statistics.median(d['enqueue_us']):10.1f}   rounds {[round(x,3) for x in d['median']]} {[round(x,3) for x in d['pipelined']]}")
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), f"diag_host_{t}.json"), "w"), indent=1)
