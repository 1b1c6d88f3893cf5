"""Test helpers for the block-sparse kernel: random cases, runners and references (float64, chunked)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from seerjax.kernels import block_sparse as bsp
from seerjax.kernels import reference
from seerjax.kernels.checks import AttentionShape, check_attention_inputs

# Interpret-mode kernels are big XLA programs and almost every case has new shapes: without
# optimization the CPU compile is ~3x faster, and these runs are checked for values, not speed.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2, jnp.dtype(jnp.float16): 1e-2}

ROW_KINDS = ("random", "empty", "full", "diagonal")


@dataclasses.dataclass(frozen=True)
class Case:
    """One random problem; arrays are made from `seed` by :func:`make_arrays`."""

    batch: int
    q_len: int
    kv_len: int
    kv_heads: int
    group: int
    head_dim: int
    block_size: int
    causal: bool
    per_query_head_mask: bool
    use_lengths: bool
    sm_scale: float | None
    dtype: str
    density: float
    seed: int
    small_tiles: bool = False  # tiles of 16-32 rows: every block is walked as several tiles

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group


@st.composite
def cases(draw, *, dtypes=("float32", "float32", "float32", "bfloat16", "float16"), max_len=600) -> Case:
    """Random cases: T, S in [1, max_len] (not multiples of the block), causal with T == S and T < S."""
    block_size = draw(st.sampled_from((16, 32, 64, 128)))
    causal = draw(st.booleans())
    use_lengths = draw(st.booleans())
    # Mostly short sequences (long cases cost seconds in interpret mode), some up to max_len, some whole
    # numbers of blocks (no partial block: the kernels then skip every element mask they can).
    length = st.one_of(
        st.integers(1, 160), st.integers(1, 160), st.integers(161, max_len), st.sampled_from((128, 256, 384))
    )
    if use_lengths or (causal and draw(st.booleans())):  # lengths need T == S
        q_len = kv_len = draw(length)
    elif causal:  # T < S, offset a multiple of the block
        q_len = min(draw(length), max_len - block_size)
        extra_blocks = draw(st.integers(1, max(1, (max_len - q_len) // block_size)))
        kv_len = q_len + extra_blocks * block_size
    else:
        q_len = draw(length)
        kv_len = draw(length)
    group = draw(st.sampled_from((1, 2, 4, 8)))
    return Case(
        batch=draw(st.integers(1, 2)),
        q_len=q_len,
        kv_len=kv_len,
        kv_heads=1 if group == 8 else draw(st.integers(1, 2)),  # at most 8 query heads: interpret-mode time
        group=group,
        head_dim=draw(st.sampled_from((32, 64, 128))),
        block_size=block_size,
        causal=causal,
        per_query_head_mask=draw(st.booleans()),
        use_lengths=use_lengths,
        sm_scale=draw(st.one_of(st.none(), st.floats(0.02, 0.5))),
        dtype=draw(st.sampled_from(dtypes)),
        density=draw(st.sampled_from((0.1, 0.3, 0.6, 0.9))),
        seed=draw(st.integers(0, 2**31 - 1)),
        small_tiles=draw(st.booleans()),
    )


def shape_of(case: Case) -> AttentionShape:
    q = jax.ShapeDtypeStruct((case.batch, case.q_len, case.q_heads, case.head_dim), jnp.dtype(case.dtype))
    kv = jax.ShapeDtypeStruct((case.batch, case.kv_len, case.kv_heads, case.head_dim), jnp.dtype(case.dtype))
    lengths = jax.ShapeDtypeStruct((case.batch,), jnp.int32) if case.use_lengths else None
    return check_attention_inputs(
        q, kv, kv, causal=case.causal, block_size=case.block_size, sm_scale=case.sm_scale, lengths=lengths
    )


def random_block_mask(rng: np.random.Generator, shape: AttentionShape, heads: int, density: float) -> np.ndarray:
    """bool `[B, heads, nq, nk]`; each row is random, empty, full or diagonal-only (causal diagonal)."""
    b, nq, nk = shape.batch, shape.nq, shape.nk
    mask = rng.random((b, heads, nq, nk)) < density
    kinds = rng.choice(len(ROW_KINDS), size=(b, heads, nq), p=(0.55, 0.15, 0.15, 0.15))
    mask[kinds == 1] = False
    mask[kinds == 2] = True
    diagonal = np.zeros((nq, nk), bool)
    rows = np.arange(nq)
    cols = np.minimum(rows + (shape.block_offset if shape.causal else 0), nk - 1)
    diagonal[rows, cols] = True
    mask = np.where((kinds == 3)[..., None], diagonal, mask)
    return mask


def make_arrays(case: Case) -> dict:
    """q, k, v, d_out (case dtype), block_mask and lengths (or None), from the case's seed."""
    shape = shape_of(case)
    rng = np.random.default_rng(case.seed)
    dtype = jnp.dtype(case.dtype)

    def normal(*dims):
        return jnp.asarray(rng.standard_normal(dims, dtype=np.float32)).astype(dtype)

    q = normal(case.batch, case.q_len, case.q_heads, case.head_dim)
    k = normal(case.batch, case.kv_len, case.kv_heads, case.head_dim)
    v = normal(case.batch, case.kv_len, case.kv_heads, case.head_dim)
    d_out = normal(case.batch, case.q_len, case.q_heads, case.head_dim)
    heads = case.q_heads if case.per_query_head_mask else case.kv_heads
    mask = jnp.asarray(random_block_mask(rng, shape, heads, case.density))
    lengths = None
    if case.use_lengths:
        lengths = jnp.asarray(rng.integers(0, case.q_len + 1, size=case.batch), jnp.int32)
    return dict(
        q=q, k=k, v=v, d_out=d_out, block_mask=mask, lengths=lengths, shape=shape, small_tiles=case.small_tiles
    )


def small_tiling(shape: AttentionShape, mask_heads: int) -> bsp.Tiling:
    """16-row query tiles, 16/32-key tiles, at most 2 heads per tile: sub-block walks in every kernel."""
    bs = shape.block_size
    heads = 2 if mask_heads == shape.kv_heads and shape.group % 2 == 0 else 1
    return bsp.Tiling(
        fwd=bsp.Tiles(q_rows=16, heads=heads, kv_rows=min(bs, 32), warps=4, stages=2),
        dq=bsp.Tiles(q_rows=min(bs, 32), heads=1, kv_rows=16, warps=4, stages=2),
        dkdv=bsp.Tiles(q_rows=16, heads=heads, kv_rows=min(bs, 32), warps=4, stages=2),
    )


# --------------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------------


def compiled(fn, *args, fast: bool):
    """jit(fn) compiled for args; `fast`: without XLA optimization (interpret-mode kernels compile ~3x faster)."""
    lowered = jax.jit(fn).lower(*args)
    return lowered.compile(compiler_options=FAST_COMPILE) if fast else lowered.compile()


def run_kernel(arrays: dict, *, interpret: bool, grads: bool, poison: bool = True) -> dict:
    """The Pallas kernel through its custom VJP; with `poison`, every output buffer starts as NaN."""
    shape = arrays["shape"]
    tiling = small_tiling(shape, arrays["block_mask"].shape[1]) if arrays["small_tiles"] else None
    plan = bsp.make_plan(
        arrays["block_mask"], shape, arrays["lengths"], arrays["q"].dtype, interpret=interpret, tiling=tiling
    )

    def forward(q, k, v, block_mask, lengths):
        return bsp._attention(q, k, v, block_mask, lengths, plan, poison)

    def forward_and_grads(q, k, v, block_mask, lengths, d_out):
        out, vjp = jax.vjp(lambda q_, k_, v_: forward(q_, k_, v_, block_mask, lengths), q, k, v)
        return (out, *vjp(d_out))

    names = ("q", "k", "v", "block_mask", "lengths")
    args = [arrays[n] for n in names]
    if grads:
        args.append(arrays["d_out"])
        results = compiled(forward_and_grads, *args, fast=interpret)(*args)
        return dict(zip(("out", "dq", "dk", "dv"), results))
    return {"out": compiled(forward, *args, fast=interpret)(*args)}


def run_reference64(arrays: dict, *, grads: bool) -> dict:
    """float64 reference (x64 enabled only inside), results as numpy float64."""
    shape = arrays["shape"]
    with jax.enable_x64(True):
        q, k, v, d_out = (jnp.asarray(np.asarray(arrays[n], np.float64)) for n in ("q", "k", "v", "d_out"))
        mask, lengths = arrays["block_mask"], arrays["lengths"]

        def forward(q, k, v):
            return reference.block_sparse_attention_reference(q, k, v, mask, shape, lengths)

        def forward_and_grads(q, k, v, d_out):
            out, vjp = jax.vjp(forward, q, k, v)
            return (out, *vjp(d_out))

        if grads:
            results = compiled(forward_and_grads, q, k, v, d_out, fast=True)(q, k, v, d_out)
            return {n: np.asarray(r) for n, r in zip(("out", "dq", "dk", "dv"), results)}
        return {"out": np.asarray(compiled(forward, q, k, v, fast=True)(q, k, v))}


def relative_errors(got: dict, want: dict, natural: dict | None = None) -> dict:
    """max |got - want| / max |want| per output.

    `natural` (optional) gives a floor for the denominator per output: a gradient can be zero
    analytically (every visible row sees exactly one key: p == 1, so dq == dk == 0), and its float32
    rounding noise is then judged against the gradient's natural size instead of against 0.
    """
    natural = natural or {}
    errors = {}
    for name, w in want.items():
        w = np.asarray(w, np.float64)
        g = np.asarray(got[name], np.float64)
        scale = max(float(np.max(np.abs(w), initial=0.0)), natural.get(name, 0.0))
        diff = float(np.max(np.abs(g - w), initial=0.0))
        errors[name] = diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)
    return errors


def natural_scales(shape: AttentionShape) -> dict:
    """Typical output magnitudes for standard-normal q, k, v, d_out: out and dv ~ 1, while dq and dk
    ~ sm_scale * |d_out . v| ~ sm_scale * sqrt(D). Floors are a fraction of these."""
    grad = 0.25 * shape.sm_scale * np.sqrt(shape.head_dim)
    return {"out": 0.05, "dv": 0.05, "dq": grad, "dk": grad}


def assert_matches(got: dict, want: dict, dtype, shape: AttentionShape, context=""):
    for name, value in got.items():
        value = np.asarray(value, np.float64)
        assert np.all(np.isfinite(value)), f"{name} has NaN/inf (unwritten tile or bad masking) {context}"
    tol = TOLERANCE[jnp.dtype(dtype)]
    errors = relative_errors(got, want, natural_scales(shape))
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative error above {tol}: {bad} (all: {errors}) {context}"


# --------------------------------------------------------------------------------------------------
# Chunked reference (long sequences on GPU)
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("shape", "chunk"))
def chunked_reference(q, k, v, block_mask, d_out, lengths, *, shape: AttentionShape, chunk: int = 256):
    """Reference out, dq, dk, dv computed `chunk` query rows at a time, in float32.

    Memory is `O(chunk * S)` per head instead of `O(T * S)`: every chunk sees all keys, so its softmax
    rows are complete; dk and dv are summed over the chunks. Needs T % chunk == 0 and chunk % block_size
    == 0 (checked by assert: test helper).
    """
    b, t, hq, d = q.shape
    s, hkv, g = shape.kv_len, shape.kv_heads, shape.group
    assert t % chunk == 0 and chunk % shape.block_size == 0
    f32 = jnp.float32
    hm = block_mask.shape[1]
    mask_q = jnp.repeat(block_mask, hq // hm, axis=1)  # [B, Hq, nq, nk]
    key_pos = jnp.arange(s)
    valid = bsp.valid_lengths(shape, lengths).reshape(b, 1, 1, 1, 1)
    kf, vf = k.astype(f32), v.astype(f32)
    einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)  # no TF32 on GPU
    blocks_per_chunk = chunk // shape.block_size

    def one_chunk(c, carry):
        dk, dv, outs, dqs = carry
        rows = c * chunk
        qc = lax_slice(q, rows, chunk).astype(f32).reshape(b, chunk, hkv, g, d)
        doc = lax_slice(d_out, rows, chunk).astype(f32).reshape(b, chunk, hkv, g, d)
        t_pos = (rows + jnp.arange(chunk))[:, None]
        blk = jax.lax.dynamic_slice_in_dim(mask_q, c * blocks_per_chunk, blocks_per_chunk, axis=2)
        blk = jnp.repeat(jnp.repeat(blk, shape.block_size, axis=2), shape.block_size, axis=3)[..., :s]
        vis = blk.reshape(b, hkv, g, chunk, s) & (key_pos < valid)
        if lengths is not None:
            vis = vis & (t_pos < valid)
        if shape.causal:
            vis = vis & (key_pos <= t_pos + (s - t))
        logits = einsum("bckgd,bskd->bkgcs", qc, kf) * shape.sm_scale
        logits = jnp.where(vis, logits, -jnp.inf)
        row_max = jnp.max(logits, axis=-1, keepdims=True)
        safe = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        e = jnp.where(vis, jnp.exp(logits - safe), 0.0)
        denom = jnp.sum(e, axis=-1, keepdims=True)
        p = e / jnp.where(denom > 0, denom, 1.0)
        out = einsum("bkgcs,bskd->bckgd", p, vf)
        delta = einsum("bckgd,bckgd->bkgc", out, doc)
        dp = einsum("bckgd,bskd->bkgcs", doc, vf)
        ds = p * (dp - delta[..., None]) * shape.sm_scale
        dq = einsum("bkgcs,bskd->bckgd", ds, kf)
        dk = dk + einsum("bkgcs,bckgd->bskd", ds, qc)
        dv = dv + einsum("bkgcs,bckgd->bskd", p, doc)
        outs = jax.lax.dynamic_update_slice_in_dim(outs, out.reshape(b, chunk, hq, d), rows, axis=1)
        dqs = jax.lax.dynamic_update_slice_in_dim(dqs, dq.reshape(b, chunk, hq, d), rows, axis=1)
        return dk, dv, outs, dqs

    zeros_kv = jnp.zeros((b, s, hkv, d), f32)
    zeros_q = jnp.zeros((b, t, hq, d), f32)
    dk, dv, out, dq = jax.lax.fori_loop(0, t // chunk, one_chunk, (zeros_kv, zeros_kv, zeros_q, zeros_q))
    return out, dq, dk, dv


def lax_slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
