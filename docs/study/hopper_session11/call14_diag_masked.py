"""Temporary: per-item cost with and without the masked diagonal step. Causal masks of k blocks per row (diagonal
included, so every item ends in a masked step) against non-causal masks of k random blocks per row (no masked step:
every block is full), same k, same launch; a line of µs per item against steps per item for each."""
import json, sys
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "eval")
import tune_kernels as tk
from timing import median_ms
from seerjax.kernels import hopper
from seerjax.kernels.checks import check_attention_inputs

T = 32768; counts = [2, 8, 32]; rounds = int(sys.argv[1]); rows = []
q, k, v = tk._inputs(T)
nq = T // 64
launch = hopper.tuned_launch(check_attention_inputs(q, k, v, causal=True, block_size=64, sm_scale=None, lengths=None), 8, hopper.sm_count())
def noncausal_rows(seed, heads, nq, kk):
    rng = np.random.default_rng(seed)
    rank = np.argsort(np.argsort(rng.random((heads, nq, nq)), axis=-1), axis=-1)
    return jnp.asarray((rank < kk)[None])
fns = {}
for causal in (True, False):
    sh = check_attention_inputs(q, k, v, causal=causal, block_size=64, sm_scale=None, lengths=None)
    plan = hopper.make_hopper_plan(sh, 8, False, **launch)
    items = nq * 8 * plan.ctas_per_row
    fn = jax.jit(lambda q, k, v, m, sh=sh: hopper.block_sparse_attention_hopper(q, k, v, m, sh, **launch))
    masks = {c: (tk.rows_of_k_blocks(5, 8, nq, c) if causal else noncausal_rows(5, 8, nq, c)) for c in counts}
    fns[causal] = (fn, masks, items)
for r in range(rounds):
    for causal, (fn, masks, items) in fns.items():
        pts = []
        for c, m in masks.items():
            ms = median_ms(fn, q, k, v, m, warmup=2, reps=5)
            steps = float(((np.asarray(m).sum(-1) + 1) // 2).mean())
            per_item = ms * 1e3 / (items / 132)
            pts.append((steps, per_item)); rows.append({"round": r, "causal": causal, "k": c, "ms": ms, "steps": steps})
            print(f"round {r} causal={causal} k={c}: {ms:.3f} ms, {steps:.2f} steps/item, {per_item:.2f} us/item", flush=True)
        x, y = np.array(pts).T
        slope, icpt = np.polyfit(x, y, 1)
        rows.append({"round": r, "causal": causal, "us_per_step": slope, "us_per_item": icpt})
        print(f"round {r} causal={causal}: {slope:.3f} us per step + {icpt:.2f} us per item", flush=True)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
