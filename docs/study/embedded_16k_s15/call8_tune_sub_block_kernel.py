"""Throwaway: launch shapes of the sub-block score kernel at 131,072 tokens, 8 × 8 sub-blocks, Llama-3.1-8B gate
shapes (32 query / 8 KV heads, d 128, bf16): ms per layer for (tq, tk, num_warps, num_stages)."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from seerjax.eval.timing import pipelined_ms
from seerjax.kernels.sub_block_scores import _pallas_forward

t, m = 131072, 8
n = t // 64
qg = jax.random.normal(jax.random.key(0), (1, n * m, 32, 128), jnp.bfloat16)
kg = jax.random.normal(jax.random.key(1), (1, n * m, 8, 128), jnp.bfloat16)
ln = jnp.full((1,), t, jnp.int32)
rows, ref = [], None
for launch in [(64, 64, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2),
               (64, 64, 4, 3), (32, 64, 4, 2), (128, 128, 4, 2)]:
    try:
        f = jax.jit(lambda q, k, launch=launch: _pallas_forward(q, k, ln, ln, t=t, s=t, sq=8, sk=8, mq=m, mk=m,
                                                                causal=True, interpret=False, launch=launch))
        out = f(qg, kg)
        if ref is None:
            ref = out
        same = bool(jnp.max(jnp.abs(out - ref)) == 0)
        ms = pipelined_ms(f, qg, kg, warmup=2, reps=10)
        rows.append({"launch": launch, "ms": ms, "same_as_first": same})
    except Exception as e:  # noqa: BLE001 (a launch that does not compile is a result too)
        rows.append({"launch": launch, "error": str(e)[:300]})
    print(rows[-1], flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "tune.json"), "w"), indent=1)
sys.exit(0)
