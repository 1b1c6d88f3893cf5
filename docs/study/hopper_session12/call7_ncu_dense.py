"""Throwaway: cuDNN, our dense and our density-0.1 forward at 32k, each called 4 times, for ncu kernel durations."""
import functools
import jax, jax.numpy as jnp
from seerjax.eval.bench_kernels import random_mask, _sparse
t = 32768
key = jax.random.key(t); kq, kk, kv, km, kg = jax.random.split(key, 5)
q = jax.random.normal(kq, (1, t, 32, 128), jnp.bfloat16)
k = jax.random.normal(kk, (1, t, 8, 128), jnp.bfloat16)
v = jax.random.normal(kv, (1, t, 8, 128), jnp.bfloat16)
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
ours = jax.jit(functools.partial(_sparse, bs=64, implementation=None))
m1 = random_mask(km, 1, 8, t // 64, t // 64, 1.0)
m01 = random_mask(km, 1, 8, t // 64, t // 64, 0.1)
jax.block_until_ready((m1, m01))
for name, f, a in (("cudnn", cudnn, (q, k, v)), ("dense", ours, (q, k, v, m1)), ("sparse", ours, (q, k, v, m01))):
    print("=== BEGIN", name, flush=True)
    for _ in range(4):
        jax.block_until_ready(f(*a))
    print("=== END", name, flush=True)
