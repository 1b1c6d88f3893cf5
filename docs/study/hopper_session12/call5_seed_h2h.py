"""Throwaway: the seed's Triton block-sparse prefill kernel (microsoft/SeerAttention, carried in runs/seed, never
committed) beside ours and cuDNN on the same masks, same GPU, same process."""
import os, sys, json, statistics
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import jax, jax.numpy as jnp, functools
import torch, triton
sys.path.insert(0, "runs/seed")
from seed_block_sparse_attn import block_sparse_triton_fn
from seerjax.eval.timing import device_ms, median_ms
from seerjax.eval.bench_kernels import random_mask, _sparse

def torch_b2b(fn, reps=7, batch_ms=50.0):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record(); fn(); e.record(); torch.cuda.synchronize(); one = s.elapsed_time(e)
    n = max(1, min(100, int(batch_ms // max(one, 1e-3)))); out = []
    for _ in range(reps):
        s.record()
        for _ in range(n): fn()
        e.record(); torch.cuda.synchronize(); out.append(s.elapsed_time(e) / n)
    return statistics.median(out)

res = []
for t in [int(x) for x in sys.argv[1].split(",")]:
    key = jax.random.key(t); kq, kk, kv, km, kg = jax.random.split(key, 5)
    q = jax.random.normal(kq, (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(kk, (1, t, 8, 128), jnp.bfloat16)
    v = jax.random.normal(kv, (1, t, 8, 128), jnp.bfloat16)
    for dens in (0.1, 1.0):
        mask = random_mask(km, 1, 8, t // 64, t // 64, dens)
        ours = jax.jit(functools.partial(_sparse, bs=64, implementation=None))
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        o_ours = ours(q, k, v, mask)
        # the seed's layout as its attention_forward calls it: bhsd, K/V repeated to the query heads, a mask per query head
        tq = torch.from_dlpack(q).transpose(1, 2).contiguous()
        tk = torch.from_dlpack(k).repeat_interleave(4, dim=2).transpose(1, 2).contiguous()
        tv = torch.from_dlpack(v).repeat_interleave(4, dim=2).transpose(1, 2).contiguous()
        tm = torch.from_dlpack(mask).repeat_interleave(4, dim=1).contiguous()
        f = lambda: block_sparse_triton_fn(tq, tk, tv, tm, 128 ** -0.5)
        o_seed = f().transpose(1, 2).float()
        diff = (o_seed - torch.from_dlpack(o_ours).float()).abs().max().item()
        rec = dict(T=t, density=dens, max_abs_diff_seed_vs_ours=diff,
                   seed_do_bench_ms=triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median"),
                   seed_b2b_ms=torch_b2b(f),
                   ours_device_ms=device_ms(ours, q, k, v, mask, reps=7),
                   ours_sync_ms=median_ms(ours, q, k, v, mask, reps=7),
                   cudnn_device_ms=device_ms(cudnn, q, k, v, reps=7))
        rec["ours_vs_seed"] = rec["seed_b2b_ms"] / rec["ours_device_ms"]
        rec["cudnn_vs_ours"] = rec["cudnn_device_ms"] / rec["ours_device_ms"]
        rec["cudnn_vs_seed"] = rec["cudnn_device_ms"] / rec["seed_b2b_ms"]
        print(json.dumps(rec), flush=True)
        res.append(rec)
        f = o_seed = None; torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "seed_h2h.json"), "w"), indent=1)
print("\n| T | density | seed (do_bench median) | seed (back to back) | ours (device) | cuDNN (device) | ours vs seed | cuDNN / ours | cuDNN / seed |")
for r in res:
    print(f"| {r['T']} | {r['density']} | {r['seed_do_bench_ms']:.3f} | {r['seed_b2b_ms']:.3f} | {r['ours_device_ms']:.3f} | {r['cudnn_device_ms']:.3f} | {r['ours_vs_seed']:.2f}x | {r['cudnn_vs_ours']:.2f}x | {r['cudnn_vs_seed']:.2f}x |")
