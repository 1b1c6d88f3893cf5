"""Throwaway: tokamax's Mosaic GPU dense attention (wheels carried in runs/whl, not committed) beside cuDNN and our
dense (density 1.0) forward, interleaved rounds of back-to-back batches (timing.interleaved_ms)."""
import os, sys, json, functools
import jax, jax.numpy as jnp
import tokamax
from seerjax.eval.timing import interleaved_ms
from seerjax.eval.bench_kernels import random_mask, _sparse

res = {}
for t in [int(x) for x in sys.argv[1].split(",")]:
    key = jax.random.key(t); kq, kk, kv, km, kg = jax.random.split(key, 5)
    q = jax.random.normal(kq, (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, 8, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, 8, 128), jnp.bfloat16)
    m1 = random_mask(km, 1, 8, t // 64, t // 64, 1.0)
    cases = {
        "cudnn": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")), (q, k, v)),
        "tokamax mosaic": (jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True, implementation="mosaic")), (q, k, v)),
        "ours dense": (jax.jit(functools.partial(_sparse, bs=64, implementation=None)), (q, k, v, m1)),
    }
    outs = {n: f(*a).astype(jnp.float32) for n, (f, a) in cases.items()}
    for n in outs:
        print(t, n, "max|diff| vs cudnn", float(jnp.max(jnp.abs(outs[n] - outs["cudnn"]))), flush=True)
    del outs
    r = interleaved_ms(cases, reps=int(sys.argv[2]) if len(sys.argv) > 2 else 5)
    res[t] = r
    for n, d in r.items():
        print(f"{t} {n:16s} device {d['ms']:9.3f} ms  sync {d['ms_sync']:9.3f}  rounds {[round(x, 3) for x in d['rounds']]}", flush=True)
json.dump({str(k): v for k, v in res.items()}, open(os.path.join(os.environ.get("OUT", "/tmp"), "tokamax_dense.json"), "w"), indent=1)
