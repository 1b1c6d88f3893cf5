"""Temporary: round-to-round variance of the 32k density-0.1 sparse forward, with the GPU's clocks sampled."""
import json, subprocess, sys, time, threading
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
from bench_kernels import random_mask
from seerjax.kernels import hopper, block_sparse_attention
from seerjax.kernels.checks import check_attention_inputs

T = 32768; rows = []; samples = []; stop = False
def sample():
    while not stop:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout.strip()
        samples.append((time.perf_counter(), out)); time.sleep(0.05)
q = jax.random.normal(jax.random.key(0), (1, T, 32, 128), jnp.bfloat16)
k = jax.random.normal(jax.random.key(1), (1, T, 8, 128), jnp.bfloat16)
v = jax.random.normal(jax.random.key(2), (1, T, 8, 128), jnp.bfloat16)
sh = check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None)
mask = random_mask(jax.random.key(3), 1, 8, T // 64, T // 64, 0.1)
plan = hopper.make_hopper_plan(sh, 8, False, **hopper.tuned_launch(sh, 8, hopper.sm_count()))
full = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m, block_size=64, implementation="hopper"))
inputs = jax.jit(lambda q, k, v, m: hopper._prepare(q, k, v, m, None, sh, None))(q, k, v, mask)
kern = jax.jit(lambda *a: hopper._forward_call(plan, *a))
cud = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
for f, a in ((full, (q, k, v, mask)), (kern, inputs), (cud, (q, k, v))):
    jax.block_until_ready(f(*a))
th = threading.Thread(target=sample, daemon=True); th.start()
def one(name, f, a, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append((time.perf_counter() - t0) * 1e3)
    rows.append({"what": name, "t": time.perf_counter(), "ms": ts})
    print(f"{name}: min {min(ts):.4f} med {sorted(ts)[len(ts)//2]:.4f} max {max(ts):.4f}", flush=True)
for r in range(6):
    one("cudnn", cud, (q, k, v), 20)
    one("full", full, (q, k, v, mask), 30)
    one("kernel", kern, inputs, 30)
time.sleep(2)
one("full after 2 s idle", full, (q, k, v, mask), 30)
one("kernel after idle", kern, inputs, 30)
stop = True; th.join()
json.dump({"rows": rows, "samples": samples}, open(sys.argv[1], "w"))
for t, s in samples[:: max(1, len(samples) // 40)]:
    print(f"{t:.2f} {s}")
