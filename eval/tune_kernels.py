"""Launch-shape sweeps (GPU) for the kernels not covered by tune_block_sparse.py.

* ``pooled``: the one-pass `attention_with_pooling` kernel's tiles (query rows, key rows, warps, stages), and the
  Mosaic GPU pooled forward (`hopper.attention_with_pooling_hopper`) beside them;
* ``hopper``: the Mosaic GPU block-sparse forward's ring depth (``stages``), compute warpgroups per CTA, query
  tiles per warpgroup and the ping-pong schedule, against the Triton kernel on the same mask;
* ``backward``: the Mosaic GPU backward (`kernels/hopper_bwd.py`) against the Triton one and cuDNN's;
* ``sub_block``: the gate's sub-block score kernel (`kernels/sub_block_scores.py`): query / key blocks per program,
  warps and stages (``--tiles`` as for pooled), each launch's output checked against the default launch's;
* ``items``: the Mosaic GPU forward's cost per work item and per step: per-KV-head masks with the same number of
  blocks in every row (the diagonal and k - 1 earlier ones at random), for several k; a least-squares line through
  (mean steps per item, µs per item) gives the per-step cost (slope) and what an item costs besides its steps
  (intercept).

Llama-3-8B attention shape (32 q / 8 kv heads, D 128, bf16, causal, block 64), B 1.

    python eval/tune_kernels.py pooled --length 32768 --json OUT/tune_pooled.json
    python eval/tune_kernels.py pooled --length 32768 --tiles 128x64x8x3,128x64x4x2 --rounds 5   # side by side
    python eval/tune_kernels.py hopper --length 131072 --densities 0.1,0.5 --json OUT/tune_hopper.json
    python eval/tune_kernels.py backward --length 32768 --densities 0.1 --json OUT/backward.json
    python eval/tune_kernels.py backward --densities 0.1 --bwd-plans first,dq2,loop,dq2-loop-noab --parts
    python eval/tune_kernels.py items --length 32768 --counts 2,8,16,32 --launches c2-fast-pp-pers132-hm-lr
    python eval/tune_kernels.py sub_block --length 131072 --grain 8x8 --json OUT/tune_sub_block.json
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from seerjax.eval.timing import device_ms, write_json

HQ, HKV, D, BS = 32, 8, 128, 64


def _inputs(t: int):
    q = jax.random.normal(jax.random.key(0), (1, t, HQ, D), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (1, t, HKV, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), (1, t, HKV, D), jnp.bfloat16)
    return q, k, v


def _time(fn, *args) -> float:
    try:
        return device_ms(fn if hasattr(fn, "lower") else jax.jit(fn), *args, warmup=2, reps=5)
    except Exception as e:  # a launch shape that does not compile (shared memory, registers)
        print(f"  {type(e).__name__}: {str(e)[:160]}", flush=True)
        return float("nan")


def parse_tiles(text: str):
    """`"128x64x4x2,128x64x8x3"` → [Tiling(128, 64, 4, 2), Tiling(128, 64, 8, 3)] (block_q x block_k x warps x stages)."""
    from seerjax.kernels import pooling

    tiles = []
    for item in filter(None, text.split(",")):
        parts = item.split("x")
        if len(parts) != 4 or not all(x.isdigit() for x in parts):
            raise SystemExit(f"--tiles: {item!r} is not block_qxblock_kxwarpsxstages, e.g. 128x64x4x2")
        tiles.append(pooling.Tiling(*map(int, parts)))
    return tiles


def sweep_pooled(t: int, tiles=None, rounds: int = 1, launches=None) -> list[dict]:
    """Every tile (or the given ones) of the one-pass kernel, `rounds` times interleaved with cuDNN, so tiles
    compared side by side see the same clocks; each row is one (round, tile) timing."""
    from seerjax.kernels import pooling
    from seerjax.kernels.checks import check_attention_inputs

    q, k, v = _inputs(t)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=BS, sm_scale=None, lengths=None)
    base = pooling.default_tiling(shape, q.dtype)
    if tiles is None:
        tiles = [pooling.Tiling(*x) for x in itertools.product((64, 128), (32, 64), (4, 8), (2, 3, 4))]
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    fns = {tiling: jax.jit(lambda q, k, v, tiling=tiling: pooling.attention_with_pooling_pallas(
        q, k, v, shape, interpret=False, tiling=tiling, passes=1)) for tiling in tiles}
    rows = []
    for r in range(rounds):
        cudnn = device_ms(dense, q, k, v)
        print(f"round {r}: cuDNN dense: {cudnn:.3f} ms", flush=True)
        for tiling, fn in fns.items():
            ms = _time(fn, q, k, v)
            rows.append({"kernel": "pooled", "round": r, "block_q": tiling.block_q, "block_k": tiling.block_k,
                         "warps": tiling.num_warps, "stages": tiling.num_stages, "ms": ms, "cudnn_ms": cudnn,
                         "vs_cudnn": ms / cudnn, "default": tiling == base})
            print(f"pooled block_q={tiling.block_q} block_k={tiling.block_k} warps={tiling.num_warps} "
                  f"stages={tiling.num_stages}: {ms:.3f} ms ({ms / cudnn:.2f}× cuDNN)"
                  f"{'  (default)' if tiling == base else ''}", flush=True)
    if rounds > 1:
        for tiling in tiles:
            ratios = sorted(x["vs_cudnn"] for x in rows if (x["block_q"], x["block_k"], x["warps"], x["stages"])
                            == (tiling.block_q, tiling.block_k, tiling.num_warps, tiling.num_stages))
            print(f"median over {rounds} rounds, {tiling}: {ratios[len(ratios) // 2]:.3f}× cuDNN "
                  f"(all: {', '.join(f'{x:.3f}' for x in ratios)})", flush=True)
    from seerjax.kernels import hopper

    if hopper.is_hopper_device() and hopper.pooling_supported(shape, q.dtype):
        for launch in launches or [None]:
            key = "first version" if launch is None else _launch_key(launch)
            fn = jax.jit(lambda q, k, v, launch=launch: hopper.attention_with_pooling_hopper(
                q, k, v, shape, launch=launch or {}))
            for r in range(rounds):
                cudnn = device_ms(dense, q, k, v)
                ms = _time(fn, q, k, v)
                rows.append({"kernel": "pooled (Mosaic GPU)", "launch": key, "round": r, "ms": ms, "cudnn_ms": cudnn,
                             "vs_cudnn": ms / cudnn, "default": False})
                print(f"round {r} pooled, Mosaic GPU {key}: {ms:.3f} ms ({ms / cudnn:.2f}× cuDNN {cudnn:.3f})",
                      flush=True)
    return rows


def sweep_sub_block(t: int, grain: tuple[int, int], tiles=None) -> list[dict]:
    """Launch shapes (tq, tk, warps, stages) of the sub-block score kernel for a per-query-head gate (d_gate 128) at
    `grain` sub-blocks per block. Every launch's logits are checked against the default launch's; one that
    differs by more than 1e-3 of their largest magnitude gets no time (NaN). Interpret mode off the GPU (for tests:
    small lengths only)."""
    from seerjax.kernels import sub_block_scores as sbs

    mq, mk = grain
    n = -(-t // BS)
    qg = jax.random.normal(jax.random.key(0), (1, n * mq, HQ, D), jnp.bfloat16)
    kg = jax.random.normal(jax.random.key(1), (1, n * mk, HKV, D), jnp.bfloat16)
    length = jnp.full((1,), t, jnp.int32)
    interpret = jax.default_backend() != "gpu"
    default = (sbs._tile(n), sbs._tile(n), 4, 2)
    if tiles is None:
        launches = [default] + [x for x in itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3)) if x != default]
    else:
        launches = [default] + [x for x in ((tl.block_q, tl.block_k, tl.num_warps, tl.num_stages) for tl in tiles) if x != default]

    def make(launch):
        return jax.jit(lambda q, k: sbs._pallas_forward(q, k, length, length, t=t, s=t, sq=BS // mq, sk=BS // mk, mq=mq,
                                                        mk=mk, causal=True, interpret=interpret, launch=launch))

    want = make(default)(qg, kg)
    rows = []
    for launch in launches:
        fn = make(launch)
        ms = _time(fn, qg, kg)
        diff = None
        if ms == ms:  # float32 accumulation order may differ with the tile shape: compare to a tolerance
            diff = float(jnp.max(jnp.abs(fn(qg, kg) - want)))
        agrees = diff is None or diff <= 1e-3 * float(jnp.max(jnp.abs(want)))
        rows.append({"kernel": "sub_block", "grain": f"{mq}x{mk}", "tq": launch[0], "tk": launch[1], "warps": launch[2],
                     "stages": launch[3], "ms": ms if agrees else float("nan"), "max_abs_diff": diff,
                     "default": launch == default})
        print(f"sub_block {mq}x{mk} tq={launch[0]} tk={launch[1]} warps={launch[2]} stages={launch[3]}: {ms:.3f} ms"
              f"{'' if agrees else f'  OUTPUT DIFFERS by {diff}'}{'  (default)' if launch == default else ''}", flush=True)
    return rows


def rows_of_k_blocks(seed: int, heads: int, nq: int, k: int):
    """bool `[1, heads, nq, nq]` causal block mask: row q holds its diagonal block and min(k, q + 1) - 1 blocks
    before it, drawn at random."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keys = rng.random((heads, nq, nq))
    cols = np.arange(nq)
    keys = np.where(cols[None, None, :] < np.arange(nq)[None, :, None], keys, np.inf)  # only blocks before the diagonal
    rank = np.argsort(np.argsort(keys, axis=-1), axis=-1)
    mask = (rank < k - 1) & np.isfinite(keys)
    mask[:, cols, cols] = True
    return jnp.asarray(mask[None])


def sweep_items(t: int, counts, launches, rounds: int = 1) -> list[dict]:
    """Per launch, the forward on masks of k blocks per row for each k of `counts`; then per launch and round the
    least-squares line of µs per item (a CTA's share of the kernel time, over its items) against mean steps per
    item: slope = µs per step, intercept = µs per item besides its steps."""
    import numpy as np

    from seerjax.kernels.checks import check_attention_inputs
    from seerjax.kernels.hopper import block_sparse_attention_hopper, make_hopper_plan, sm_count

    q, k, v = _inputs(t)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=BS, sm_scale=None, lengths=None)
    nq = t // BS
    masks = {c: rows_of_k_blocks(5, HKV, nq, c) for c in counts}
    per_row = {c: np.asarray(mask).sum(-1) for c, mask in masks.items()}  # blocks in each list row
    rows = []
    for launch in launches:
        key = _launch_key(launch)
        plan = make_hopper_plan(shape, HKV, False, **launch)
        items = nq * HKV * plan.ctas_per_row
        ctas = min(plan.persistent or items, sm_count())  # CTAs running at once (one per SM)
        fn = jax.jit(lambda q, k, v, m, launch=launch: block_sparse_attention_hopper(q, k, v, m, shape, **launch))
        mean_steps = {c: float(((n + plan.per_step - 1) // plan.per_step).mean()) for c, n in per_row.items()}
        for r in range(rounds):
            pts = []
            for c, mask in masks.items():
                ms = _time(fn, q, k, v, mask)
                per_item_us = ms * 1e3 / (items / ctas)
                pts.append((mean_steps[c], per_item_us))
                rows.append({"kernel": "hopper", "launch": key, "round": r, "k": c, "ms": ms,
                             "mean_steps": mean_steps[c], "us_per_item": per_item_us})
                print(f"round {r} {key} k={c}: {ms:.3f} ms, {mean_steps[c]:.2f} steps per item, "
                      f"{per_item_us:.2f} µs per item", flush=True)
            x, y = np.array(pts).T
            slope, intercept = np.polyfit(x, y, 1)
            rows.append({"kernel": "fit", "launch": key, "round": r, "us_per_step": float(slope),
                         "us_per_item_overhead": float(intercept), "ms": float("nan")})
            print(f"round {r} {key}: {slope:.3f} µs per step, {intercept:.2f} µs per item besides its steps",
                  flush=True)
    return rows


def _launch_key(launch: dict) -> str:
    """A launch's name in the tables and JSON rows: its options, sorted."""
    return "-".join(f"{a}={b}" for a, b in sorted(launch.items()))


def _parse_options(text: str, flag: str, numbered: dict, words: dict, names: str) -> list[dict]:
    """Comma-separated items of '-'-joined tokens → keyword dicts: a token `<prefix>N` of `numbered` sets
    `numbered[prefix] = N`, a token of `words` adds its dict; anything else stops with `flag` and `names`."""
    out = []
    for item in filter(None, text.split(",")):
        opts = {}
        for part in item.split("-"):
            prefix = next((p for p in numbered if part.startswith(p) and part[len(p):].isdigit()), None)
            if prefix is not None:
                opts[numbered[prefix]] = int(part[len(prefix):])
            elif part in words:
                opts.update(words[part])
            else:
                raise SystemExit(f"{flag}: {part!r} in {item!r} is not {names}")
        out.append(opts)
    return out


_FAST = {"pair_blocks": True, "early_wait": True, "auto_barriers": False}


def parse_launches(text: str) -> list[dict]:
    """`"c2,c2-pp,c1-pair-early-noab-s3"` → launch keyword dicts of `block_sparse_attention_hopper`: `cN`
    consumers, `tN` tiles per warpgroup, `sN` stages, `pp` ping-pong, `pair` two blocks per step, `early` the
    next K waited for under P V, `noab` no automatic barriers, `fast` = pair-early-noab, `persN` a persistent
    grid of N CTAs, `hm` its items ordered head-major, `lr` its output buffers released late, `ov` intra-warpgroup
    overlap (no `pp`, `early`), `rbN` (pooled only) the row maxima of N steps stored at once."""
    return _parse_options(
        text, "--launches",
        {"c": "consumers", "t": "tiles_per_wg", "s": "stages", "pers": "persistent", "rb": "rowmax_batch"},
        {"hm": {"head_major": True}, "lr": {"late_release": True}, "ov": {"overlap": True}, "pp": {"pingpong": True},
         "pair": {"pair_blocks": True}, "early": {"early_wait": True}, "noab": {"auto_barriers": False},
         "fast": _FAST},
        "cN, tN, sN, persN, rbN, hm, lr, ov, pp, pair, early, noab or fast")


def sweep_hopper(t: int, densities, launches=None, masks=("query", "kv"), rounds: int = 1) -> list[dict]:
    """The Mosaic GPU forward's launch options against the Triton kernel on the same mask (and, with `launches`,
    cuDNN's dense forward in the same process, each of `rounds` rounds timing everything once)."""
    from seerjax.eval.bench_kernels import random_mask
    from seerjax.kernels.block_sparse import block_sparse_attention_pallas
    from seerjax.kernels.checks import check_attention_inputs
    from seerjax.kernels.hopper import block_sparse_attention_hopper

    q, k, v = _inputs(t)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=BS, sm_scale=None, lengths=None)
    rows = []
    if launches is not None:
        cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        fns = {}
        for name, dens in itertools.product(masks, densities):
            mask = random_mask(jax.random.key(3), 1, HQ if name == "query" else HKV, t // BS, t // BS, dens)
            fns[(name, dens, "triton")] = (jax.jit(lambda q, k, v, m: block_sparse_attention_pallas(
                q, k, v, m, shape, interpret=False)), mask)
            for launch in launches:
                key = _launch_key(launch)
                fns[(name, dens, key)] = (jax.jit(lambda q, k, v, m, launch=launch: block_sparse_attention_hopper(
                    q, k, v, m, shape, **launch)), mask)
        for r in range(rounds):
            base = _time(cudnn, q, k, v)
            rows.append({"kernel": "cudnn", "density": 1.0, "ms": base, "round": r})
            print(f"round {r} cuDNN dense: {base:.3f} ms", flush=True)
            for (name, dens, key), (fn, mask) in fns.items():
                ms = _time(fn, q, k, v, mask)
                rows.append({"kernel": "triton" if key == "triton" else "hopper", "mask": name, "density": dens,
                             "launch": key, "ms": ms, "speedup": base / ms, "round": r})
                print(f"round {r} {name:5s} d={dens:<4} {key}: {ms:.3f} ms ({base / ms:.2f}x cuDNN)", flush=True)
        return rows
    for mask_heads, dens in itertools.product((HQ, HKV), densities):
        mask = random_mask(jax.random.key(3), 1, mask_heads, t // BS, t // BS, dens)
        name = "query" if mask_heads == HQ else "kv"
        ms = _time(lambda q, k, v, m: block_sparse_attention_pallas(q, k, v, m, shape, interpret=False), q, k, v, mask)
        rows.append({"kernel": "triton", "mask": name, "density": dens, "ms": ms})
        print(f"{name:5s} d={dens:<4} triton: {ms:.3f} ms", flush=True)
        tiles = (HQ // mask_heads) * (BS // 64)
        for stages, consumers, tpw, pp in itertools.product((2, 3, 4), (1, 2), (1, 2), (False, True)):
            if tiles % (consumers * tpw):  # the tiles of a list row must split evenly over the CTA's tiles
                continue
            if pp and (consumers != 2 or tpw != 1):  # the ping-pong schedule pairs two one-tile warpgroups
                continue
            fn = lambda q, k, v, m, s=stages, c=consumers, w=tpw, p=pp: block_sparse_attention_hopper(  # noqa: E731
                q, k, v, m, shape, stages=s, consumers=c, tiles_per_wg=w, pingpong=p)
            ms = _time(fn, q, k, v, mask)
            rows.append({"kernel": "hopper", "mask": name, "density": dens, "stages": stages,
                         "consumers": consumers, "tiles_per_wg": tpw, "pingpong": pp, "ms": ms})
            print(f"{name:5s} d={dens:<4} hopper stages={stages} consumers={consumers} tiles_per_wg={tpw} "
                  f"pingpong={pp}: {ms:.3f} ms", flush=True)
    return rows


def parse_bwd_plans(text: str) -> list[dict]:
    """`"first,dq2-loop-noab"` → `hopper_bwd.BwdPlan` keyword dicts: `dqN` dq compute warpgroups, `kcN` dk/dv
    compute warpgroups, `loop` one dk/dv CTA per KV head walking its query heads, `ov` overlapped products, `fd`
    delta computed in the dq kernel, `noab` no automatic barriers, `sN` stages, `first` the first version (none of
    them), `tuned` the dispatch's (`hopper_bwd.tuned_bwd_plan`)."""
    return _parse_options(
        text, "--bwd-plans", {"dq": "dq_consumers", "kc": "dkdv_consumers", "s": "stages"},
        {"first": {}, "tuned": {"tuned": True}, "loop": {"kv_loop": True}, "ov": {"overlap": True},
         "fd": {"fused_delta": True}, "noab": {"auto_barriers": False}},
        "first, tuned, dqN, kcN, sN, loop, ov, fd or noab")


def compare_backward(t: int, densities, plans=None, parts: bool = False) -> list[dict]:
    """The portable (Triton) backward against the Mosaic GPU one (each plan of `plans`, default the first
    version and the dispatch's) on the same residuals, and cuDNN's; with `parts`, each Mosaic GPU plan's pieces
    timed alone (delta, dq kernel, transposed lists, dk/dv kernel with its partial sums)."""
    from seerjax.eval.bench_kernels import random_mask
    from seerjax.kernels import block_sparse as bsp
    from seerjax.kernels import hopper_bwd
    from seerjax.kernels.checks import check_attention_inputs

    plans = plans if plans is not None else [{}, {"tuned": True}]
    q, k, v = _inputs(t)
    do = jax.random.normal(jax.random.key(4), q.shape, q.dtype)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=BS, sm_scale=None, lengths=None)

    def dense_loss(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32))

    cudnn_fwd = device_ms(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn")), q, k, v)
    cudnn_bwd = device_ms(jax.jit(jax.grad(dense_loss, argnums=(0, 1, 2))), q, k, v) - cudnn_fwd
    print(f"cuDNN dense backward: {cudnn_bwd:.3f} ms", flush=True)
    rows = [{"kernel": "cudnn", "density": 1.0, "ms": cudnn_bwd}]
    for mask_heads, dens in itertools.product((HQ, HKV), densities):
        mask = random_mask(jax.random.key(3), 1, mask_heads, t // BS, t // BS, dens)
        pplan = bsp.make_plan(mask, shape, None, q.dtype, interpret=False)
        _, residuals = jax.jit(lambda q, k, v, m, p=pplan: bsp._forward(q, k, v, m, None, p, False))(q, k, v, mask)
        name = "query" if mask_heads == HQ else "kv"
        ms = _time(lambda r, g, p=pplan: bsp._backward(p, False, r, g), residuals, do)
        rows.append({"kernel": "triton", "mask": name, "density": dens, "ms": ms, "speedup": cudnn_bwd / ms})
        print(f"{name:5s} d={dens:<4} triton backward: {ms:.3f} ms ({cudnn_bwd / ms:.2f}× cuDNN)", flush=True)
        hres = jax.jit(hopper_bwd.from_portable_residuals)(residuals)
        for spec in plans:
            opts = {key: val for key, val in spec.items() if key != "tuned"}
            if spec.get("tuned"):
                hplan = hopper_bwd.tuned_bwd_plan(shape, mask_heads, False)
            else:
                try:
                    hplan = hopper_bwd.BwdPlan(shape, mask_heads, False, **opts)
                except ValueError as e:
                    print(f"{name:5s} d={dens:<4} {spec}: {e}", flush=True)
                    continue
            key = "tuned" if spec.get("tuned") else (_launch_key(opts) or "first")
            ms = _time(lambda r, g, p=hplan: hopper_bwd.backward_hopper(p, r, g), hres, do)
            row = {"kernel": "hopper", "plan": key, "mask": name, "density": dens, "ms": ms, "speedup": cudnn_bwd / ms}
            print(f"{name:5s} d={dens:<4} hopper {key} backward: {ms:.3f} ms ({cudnn_bwd / ms:.2f}× cuDNN)", flush=True)
            if parts:
                row["parts"] = _backward_parts(hplan, hres, do)
                print("      parts: " + ", ".join(f"{a} {b:.3f} ms" for a, b in row["parts"].items()), flush=True)
            rows.append(row)
    return rows


def _backward_parts(plan, residuals, do) -> dict:
    """Milliseconds of each piece of `hopper_bwd.backward_hopper`, each jitted and timed alone."""
    from seerjax.kernels import hopper_bwd
    from seerjax.kernels.block_sparse import _pad_seq, compact_block_lists

    q_p, k_p, v_p, out_p, lse_t, lists, spans, valid, visible, full = residuals
    do_p = _pad_seq(do, q_p.shape[1])

    def delta(do_p, out_p):
        return jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), out_p.astype(jnp.float32))

    def tlists(visible, full):
        return compact_block_lists(jnp.swapaxes(visible, 2, 3), jnp.swapaxes(full, 2, 3))

    delta_t = jax.jit(delta)(do_p, out_p)
    tl, ts = jax.jit(tlists)(visible, full)
    return {
        "delta": 0.0 if plan.fused_delta else _time(delta, do_p, out_p),  # fused: inside the dq kernel
        "dq": _time(lambda *a: hopper_bwd._dq_call(plan, *a), lists, spans, valid, q_p, k_p, v_p, do_p, lse_t,
                    out_p if plan.fused_delta else delta_t),
        "tlists": _time(tlists, visible, full),
        "dkdv": _time(lambda *a: hopper_bwd._dkdv_call(plan, *a), tl, ts, valid, q_p, k_p, v_p, do_p, lse_t,
                      delta_t),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kernel", choices=("pooled", "hopper", "backward", "items", "sub_block"))
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--densities", default="0.1,0.5", help="hopper and backward only")
    p.add_argument("--tiles", default=None, help="pooled and sub_block: these tiles, e.g. 128x64x4x2,128x64x8x3 (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="pooled only: time cuDNN and every tile this many times")
    p.add_argument("--launches", default=None,
                   help="hopper (and pooled: the Mosaic GPU pooled forward's launches): these launches (e.g. c2,c2-pp,c2-fast; see parse_launches) with cuDNN in the same "
                   "rounds, instead of the full stages/consumers/tiles/pingpong grid")
    p.add_argument("--masks", default="query,kv", help="hopper --launches only: mask kinds (query, kv)")
    p.add_argument("--bwd-plans", default=None,
                   help="backward only: Mosaic GPU backward plans, e.g. first,dq2-loop-noab,tuned (see parse_bwd_plans)")
    p.add_argument("--parts", action="store_true", help="backward only: time each plan's pieces alone too")
    p.add_argument("--counts", default="2,8,16,32", help="items only: blocks per row, e.g. 2,8,16,32")
    p.add_argument("--grain", default="8x8", help="sub_block only: query x key sub-blocks per block, e.g. 8x8")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.kernel == "pooled":
        rows = sweep_pooled(args.length, parse_tiles(args.tiles) if args.tiles else None, args.rounds,
                            parse_launches(args.launches) if args.launches else None)
    elif args.kernel == "hopper":
        masks = tuple(filter(None, args.masks.split(",")))
        if not set(masks) <= {"query", "kv"}:
            p.error(f"--masks: expected query and/or kv, got {args.masks!r}")
        rows = sweep_hopper(args.length, [float(x) for x in args.densities.split(",")],
                            parse_launches(args.launches) if args.launches else None, masks, args.rounds)
    elif args.kernel == "sub_block":
        from seerjax.gate import GateConfigError, parse_grain

        try:
            grain = parse_grain(args.grain)
        except GateConfigError as e:
            p.error(f"--grain: {e}")
        if BS % grain[0] or BS % grain[1]:
            p.error(f"--grain: expected QxK sub-blocks dividing the block ({BS}), e.g. 8x8, got {args.grain!r}")
        rows = sweep_sub_block(args.length, grain, parse_tiles(args.tiles) if args.tiles else None)
    elif args.kernel == "items":
        try:
            counts = [int(x) for x in args.counts.split(",") if x]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            p.error(f"--counts: expected positive block counts, got {args.counts!r}")
        rows = sweep_items(args.length, counts, parse_launches(args.launches or "c2-fast-pp-pers132-hm-lr"),
                           args.rounds)
    else:
        rows = compare_backward(args.length, [float(x) for x in args.densities.split(",")],
                                parse_bwd_plans(args.bwd_plans) if args.bwd_plans else None, args.parts)
    good = [r for r in rows if r["ms"] == r["ms"]]
    if good:
        best = min(good, key=lambda r: r["ms"])
        print(f"best: {best}")
    write_json(args.json, args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
