"""The Pallas attention-with-pooling kernel against the float64 reference.

CPU runs the kernel in interpret mode; outputs start as NaN (`poison_outputs=True`), so an
element the kernel never writes fails the NaN check. Every case runs through both paths (PATHS):
the two-pass kernel and the one-pass kernel with its rowmax epilogue. The `gpu` class compiles
the same cases.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import (
    KINDS,
    TOLERANCE,
    Case,
    attention_cases,
    fast_jit,
    reference_float64,
    relative_error,
)
from seerjax.kernels import api, pooling, reference
from seerjax.kernels.checks import check_attention_inputs

# On the GPU every example compiles its own kernels; SEERJAX_MAX_EXAMPLES caps the count for a quick pass.
_CAP = int(os.environ.get("SEERJAX_MAX_EXAMPLES", "1000000"))


def _settings(n: int):
    return settings(
        max_examples=min(n, _CAP),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def cases_and_tilings(draw, dtypes, causal=None, kind=None):
    """A case and, for half of them, a tiling other than the default: query tiles of half, one
    or two blocks, key tiles of half or one block."""
    case = draw(attention_cases(dtypes=dtypes, causal=causal, kind=kind))
    if not draw(st.booleans()):
        return case, None
    bs = case.block_size
    block_q = draw(st.sampled_from(sorted({max(16, bs // 2), bs, min(128, 2 * bs)})))
    block_k = draw(st.sampled_from(sorted({max(16, bs // 2), bs})))
    tiling = pooling.Tiling(block_q, block_k, num_warps=4 if block_q * case.head_dim < 128 * 128 else 8, num_stages=2)
    if pooling.shared_memory_bytes(tiling, case.head_dim, case.dtype) > 160 * 1024:  # fits every GPU of note
        tiling = dataclasses.replace(tiling, num_stages=1)
    return case, tiling


# Path knobs of `attention_with_pooling_pallas`. "one_pass" has no rowmax budget, so it runs query
# heads one GQA group per call: chunked when Hkv > 1, a single call when Hkv == 1.
PATHS = {
    "two_pass": {"passes": 2},
    "one_pass": {"passes": 1, "rowmax_budget": 0},
    "one_pass_unchunked": {"passes": 1},
}
# Both paths, for the hypothesis tests (which would take twice as long again with a third).
BOTH_PATHS = pytest.mark.parametrize("path", ["two_pass", "one_pass"])


def check_case(case: Case, tiling: pooling.Tiling | None = None, *, interpret: bool = True, path: str = "two_pass"):
    """Runs the kernel on `case` along `path` (a key of PATHS) and compares out, pooled and lse
    with the float64 reference."""
    if os.environ.get("SEERJAX_TRACE_CASES"):  # which case a slow or stuck run is on
        print(f"\ncase {case} tiling {tiling} path {path} {time.strftime('%X')}", flush=True)
    q, k, v, lengths = case.arrays()
    shape = case.shape(q, k, v, lengths)
    kernel = functools.partial(
        pooling.attention_with_pooling_pallas,
        shape=shape,
        return_lse=True,
        interpret=interpret,
        tiling=tiling,
        poison_outputs=True,
        **PATHS[path],
    )
    out, pooled, lse = fast_jit(kernel)(q, k, v, lengths=lengths)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert pooled.dtype == jnp.float32 and pooled.shape == (shape.batch, shape.q_heads, shape.nq, shape.nk)
    assert lse.dtype == jnp.float32 and lse.shape == (shape.batch, shape.q_heads, shape.q_len)
    ref_out, ref_pooled, ref_lse = reference_float64(
        reference.attention_with_pooling_reference, q, k, v, lengths=lengths, shape=shape, return_lse=True
    )
    tol = TOLERANCE[case.dtype]
    for name, got, want in (("out", out, ref_out), ("pooled", pooled, ref_pooled), ("lse", lse, ref_lse)):
        err = relative_error(name, got, want)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol} for {case}, {tiling}, {path}"


# Every (causal, kind) category gets its share of the examples: 6 x 15 float32, 6 x 6 16-bit.
categories = pytest.mark.parametrize("causal,kind", [(c, k) for c in (False, True) for k in KINDS])


@BOTH_PATHS
@categories
@_settings(15)
@given(data=st.data())
def test_matches_reference_float32(path, causal, kind, data):
    check_case(*data.draw(cases_and_tilings(("float32",), causal, kind)), path=path)


@BOTH_PATHS
@categories
@_settings(6)
@given(data=st.data())
def test_matches_reference_low_precision(path, causal, kind, data):
    check_case(*data.draw(cases_and_tilings(("bfloat16", "float16"), causal, kind)), path=path)


EDGE_CASES = {
    # float32, D = 128, block 128: 64-row tiles, the finer map is max-reduced.
    "split_tile": (Case(1, 200, 200, 1, 2, 128, 128, True, None, None, "float32", 1), None),
    "split_tile_offset": (Case(1, 77, 333, 2, 1, 128, 128, False, None, 0.1, "float32", 2), None),
    # The production tiling (128 query rows = two pooled rows per program) with padding rows.
    "two_blocks_per_tile": (
        Case(2, 300, 300, 2, 4, 64, 64, True, (130, 300), None, "float32", 3),
        pooling.Tiling(block_q=128, block_k=64, num_warps=8, num_stages=3),
    ),
    "two_blocks_per_tile_bf16": (Case(1, 250, 250, 1, 4, 128, 64, True, (200,), None, "bfloat16", 4), None),
    "aligned_production_tiling": (Case(1, 512, 512, 2, 4, 128, 64, True, None, None, "bfloat16", 12), None),
    "aligned_non_causal": (Case(2, 256, 128, 1, 2, 64, 32, False, None, None, "float32", 13), None),
    "all_padding_and_full": (Case(2, 96, 96, 1, 4, 32, 32, True, (0, 96), None, "float32", 5), None),
    "one_query_row": (Case(1, 1, 1, 1, 1, 64, 16, True, None, None, "float32", 6), None),
    "causal_offset_one_row": (Case(1, 1, 129, 1, 2, 32, 64, True, None, None, "bfloat16", 7), None),
    "one_key_many_tiles": (Case(1, 300, 1, 1, 1, 32, 16, False, None, None, "float32", 8), None),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases(name, path):
    check_case(*EDGE_CASES[name], path=path)


def test_rejects_bad_tiling():
    case = Case(1, 64, 64, 1, 1, 32, 32, True, None, None, "float32", 0)
    q, k, v, _ = case.arrays()
    with pytest.raises(ValueError, match="block_k"):
        pooling.attention_with_pooling_pallas(
            q, k, v, case.shape(q, k, v, None), interpret=True, tiling=pooling.Tiling(32, 64, 4, 2)
        )
    with pytest.raises(ValueError, match="passes"):
        pooling.attention_with_pooling_pallas(q, k, v, case.shape(q, k, v, None), interpret=True, passes=3)


def test_api_routes_to_kernel():
    case = Case(1, 40, 40, 1, 2, 32, 16, True, None, None, "float32", 9)
    q, k, v, _ = case.arrays()
    out, pooled = api.attention_with_pooling(q, k, v, block_size=16, implementation="pallas_interpret")
    ref_out, ref_pooled = api.attention_with_pooling(q, k, v, block_size=16, implementation="reference")
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-6)


def test_poison_detects_unwritten_tiles(monkeypatch):
    """With the two-pass kernel's zero-fill store of invisible pooled tiles removed, the poison
    shows as NaN: so the NaN check in `check_case` does catch tiles the kernel fails to write."""
    case = Case(1, 48, 48, 1, 1, 32, 16, True, None, None, "float32", 10)
    q, k, v, _ = case.arrays()
    shape = case.shape(q, k, v, None)
    no_store = types.SimpleNamespace(store=lambda *a, **kw: None, CompilerParams=pooling.plgpu.CompilerParams)
    monkeypatch.setattr(pooling, "plgpu", no_store)
    pooling._forward.clear_cache()
    try:
        _, pooled = pooling.attention_with_pooling_pallas(
            q, k, v, shape, interpret=True, poison_outputs=True, passes=2
        )
    finally:
        pooling._forward.clear_cache()  # do not leave the broken kernel in the jit cache
    pooled = np.asarray(pooled)
    invisible = np.triu(np.ones((shape.nq, shape.nk), bool), k=1)
    assert np.isnan(pooled[0, 0][invisible]).all()
    assert not np.isnan(pooled[0, 0][~invisible]).any()
    with pytest.raises(AssertionError, match="NaN"):
        relative_error("pooled", pooled, np.zeros_like(pooled))


def _lower_for_cuda(case: Case, tiling: pooling.Tiling | None, **knobs):
    """Lowers the compiled (non-interpret) kernel for CUDA from CPU: the Triton lowering's shape
    rules (power-of-2 tensors, verified Triton IR) fail here, without a GPU. `knobs`: passes,
    rowmax_budget."""
    dt = jnp.dtype(case.dtype)
    q = jax.ShapeDtypeStruct((case.batch, case.q_len, case.q_heads, case.head_dim), dt)
    kv = jax.ShapeDtypeStruct((case.batch, case.kv_len, case.kv_heads, case.head_dim), dt)
    lengths = None if case.lengths is None else jax.ShapeDtypeStruct((case.batch,), jnp.int32)
    shape = check_attention_inputs(
        q, kv, kv, causal=case.causal, block_size=case.block_size, sm_scale=case.sm_scale, lengths=lengths
    )

    def f(q, k, v, lengths):
        return pooling.attention_with_pooling_pallas(
            q, k, v, shape, lengths=lengths, return_lse=True, interpret=False, tiling=tiling, **knobs
        )

    return jax.jit(f).trace(q, kv, kv, lengths).lower(lowering_platforms=("cuda",)).as_text()


LOWERING_CASES = {
    "production_32k": (Case(1, 32768, 32768, 8, 4, 128, 64, True, None, None, "bfloat16", 0), None),
    "two_blocks_per_tile_lengths": (Case(2, 1000, 1000, 2, 2, 64, 64, True, (1, 1), None, "bfloat16", 0), None),
    "lengths_ragged_fp16": (Case(2, 600, 600, 1, 8, 32, 16, True, (1, 2), None, "float16", 0), None),
    "split_tile_d256_fp32": (Case(1, 333, 333, 2, 2, 256, 128, False, None, 0.1, "float32", 0), None),
    "causal_offset": (Case(1, 64, 1088, 2, 2, 64, 32, True, None, None, "bfloat16", 0), None),
    "finer_key_tiles": (
        Case(1, 500, 500, 2, 2, 64, 32, True, None, None, "bfloat16", 0),
        pooling.Tiling(block_q=64, block_k=16, num_warps=4, num_stages=2),
    ),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("name", sorted(LOWERING_CASES))
def test_lowers_for_cuda(name, path):
    text = _lower_for_cuda(*LOWERING_CASES[name], **PATHS[path])
    assert "__gpu$xla.gpu.triton" in text
    assert ("seerjax_attention_with_pooling_one_pass" in text) == path.startswith("one_pass")


@pytest.mark.parametrize(
    "q_len,budget,chunk",
    [
        (32768, None, 32),  # 2 GiB rowmax: all 32 heads in one call
        (131072, None, 4),  # 32 GiB: 8 calls of one GQA group (4 heads, 4 GiB each)
        (32768, 2**27, None),  # one group's 256 MiB is over the budget: two passes
    ],
)
def test_auto_path_for_llama3_8b(q_len, budget, chunk):
    """`passes=None` on the Llama-3-8B shape (32 / 8 heads, D 128, bf16, causal, block 64): the
    heads per one-pass call (None: two passes), and that the lowered kernel follows it."""
    case = Case(1, q_len, q_len, 8, 4, 128, 64, True, None, None, "bfloat16", 0)
    knobs = {} if budget is None else {"rowmax_budget": budget}
    text = _lower_for_cuda(case, None, **knobs)
    assert ("seerjax_attention_with_pooling_one_pass" in text) == (chunk is not None)
    q = jax.ShapeDtypeStruct((1, q_len, 32, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, q_len, 8, 128), jnp.bfloat16)
    shape = check_attention_inputs(q, kv, kv, causal=True, block_size=64, sm_scale=None, lengths=None)
    tiling = pooling.default_tiling(shape, jnp.bfloat16)
    assert pooling.heads_per_chunk(shape, tiling, pooling.ROWMAX_BUDGET_BYTES if budget is None else budget) == chunk


def chunked_reference(q, k, v, shape, lengths=None, chunk: int = 512):
    """The reference in float32, `chunk` query rows at a time (chunk a multiple of the block), so
    long sequences fit in memory. Returns out, pooled, lse as float64 numpy arrays."""
    assert chunk % shape.block_size == 0
    t = shape.q_len

    @jax.jit
    def rows(q_chunk, k, v, lengths, start):
        cd = jnp.float32
        b, c, hq, d = q_chunk.shape
        qg = q_chunk.astype(cd).reshape(b, c, shape.kv_heads, shape.group, d)
        s = jnp.einsum("bckgd,bskd->bkgcs", qg, k.astype(cd), precision=jax.lax.Precision.HIGHEST)
        s = s.reshape(b, hq, c, shape.kv_len) * shape.sm_scale
        t_idx = start + jnp.arange(c)[:, None]
        s_idx = jnp.arange(shape.kv_len)[None, :]
        vis = (t_idx < t) & (s_idx >= 0)
        if shape.causal:
            vis = vis & (s_idx <= t_idx + (shape.kv_len - shape.q_len))
        vis = vis[None, None]
        if lengths is not None:
            n = lengths[:, None, None, None]
            vis = vis & (s_idx < n) & (t_idx < n)
        s = jnp.where(vis, s, -jnp.inf)
        m = jnp.max(s, axis=-1, keepdims=True)
        ok = jnp.isfinite(m)
        e = jnp.where(vis, jnp.exp(s - jnp.where(ok, m, 0.0)), 0.0)
        z = jnp.sum(e, axis=-1, keepdims=True)
        p = e / jnp.where(ok, z, 1.0)
        lse = jnp.where(ok, m + jnp.log(jnp.where(ok, z, 1.0)), -jnp.inf)[..., 0]
        pg = p.reshape(b, shape.kv_heads, shape.group, c, shape.kv_len)
        out = jnp.einsum("bkgcs,bskd->bckgd", pg, v.astype(cd), precision=jax.lax.Precision.HIGHEST)
        return out.reshape(b, c, hq, d), reference.block_max_pool(p, shape.block_size), lse

    q_pad = jnp.pad(q, ((0, 0), (0, -t % chunk), (0, 0), (0, 0)))
    parts = [
        [np.asarray(x, np.float64) for x in rows(q_pad[:, c0 : c0 + chunk], k, v, lengths, c0)]
        for c0 in range(0, t, chunk)
    ]
    out, pooled, lse = (np.concatenate([p[n] for p in parts], axis) for n, axis in ((0, 1), (1, 2), (2, 2)))
    return out[:, :t], pooled[:, :, : shape.nq], lse[:, :, :t]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
class TestCompiledOnGpu:
    """The same cases, compiled with the Triton lowering (implementation="pallas")."""

    @BOTH_PATHS
    @categories
    @_settings(15)
    @given(data=st.data())
    def test_matches_reference_float32(self, path, causal, kind, data):
        check_case(*data.draw(cases_and_tilings(("float32",), causal, kind)), interpret=False, path=path)

    @BOTH_PATHS
    @categories
    @_settings(6)
    @given(data=st.data())
    def test_matches_reference_low_precision(self, path, causal, kind, data):
        check_case(*data.draw(cases_and_tilings(("bfloat16", "float16"), causal, kind)), interpret=False, path=path)

    @pytest.mark.parametrize("path", sorted(PATHS))
    @pytest.mark.parametrize("name", sorted(EDGE_CASES))
    def test_edge_cases(self, name, path):
        check_case(*EDGE_CASES[name], interpret=False, path=path)

    def test_api_default_is_compiled_kernel(self):
        assert api.default_implementation() == "pallas"
        case = Case(1, 300, 300, 2, 4, 128, 64, True, (300,), None, "bfloat16", 9)
        q, k, v, lengths = case.arrays()
        out, pooled = api.attention_with_pooling(q, k, v, lengths=lengths, implementation="pallas")
        ref_out, ref_pooled = api.attention_with_pooling(q, k, v, lengths=lengths, implementation="reference")
        assert relative_error("out", out, ref_out) <= TOLERANCE["bfloat16"]
        assert relative_error("pooled", pooled, ref_pooled) <= TOLERANCE["bfloat16"]

    @pytest.mark.parametrize("path", ["two_pass", "one_pass_unchunked"])
    def test_production_32k(self, path):
        """B 1, T = S = 32k, 32 query / 8 kv heads, D 128, block 64, bf16, causal."""
        case = Case(1, 32768, 32768, 8, 4, 128, 64, True, None, None, "bfloat16", 10)
        q, k, v, _ = case.arrays()
        shape = case.shape(q, k, v, None)
        out, pooled, lse = pooling.attention_with_pooling_pallas(
            q, k, v, shape, return_lse=True, interpret=False, poison_outputs=True, **PATHS[path]
        )
        ref_out, ref_pooled, ref_lse = chunked_reference(q, k, v, shape)
        tol = TOLERANCE["bfloat16"]
        for name, got, want in (("out", out, ref_out), ("pooled", pooled, ref_pooled), ("lse", lse, ref_lse)):
            err = relative_error(name, got, want)
            assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def test_chunked_reference_matches_reference():
    """The helper the 32k GPU test trusts, checked on a small case (T not a multiple of chunk)."""
    case = Case(2, 200, 200, 2, 2, 32, 16, True, (150, 200), None, "float32", 11)
    q, k, v, lengths = case.arrays()
    shape = case.shape(q, k, v, lengths)
    got = chunked_reference(q, k, v, shape, lengths, chunk=64)
    want = reference.attention_with_pooling_reference(q, k, v, shape, lengths, return_lse=True)
    for name, g, w in zip(("out", "pooled", "lse"), got, want):
        assert relative_error(name, g, w) <= 1e-5


def test_a_tiling_over_the_gpus_shared_memory_is_refused_by_name(monkeypatch):
    """On the H100, 128 x 128 float32 tiles at D 128 with 2 stages asked XLA for 262,656 bytes of shared memory
    and failed at run time (RESOURCE_EXHAUSTED); the wrapper now refuses such a tiling before compiling."""
    case = Case(1, 256, 256, 1, 1, 128, 128, True, None, None, "float32", 0)
    q, k, v, _ = case.arrays()
    shape = case.shape(q, k, v, None)
    big = pooling.Tiling(128, 128, 8, 2)
    assert pooling.shared_memory_bytes(big, 128, jnp.float32) == 262144
    with pytest.raises(pooling.KernelInputError, match=r"tiling .*block_k=128.* 262,144 bytes of shared memory .* 232,448"):
        pooling.attention_with_pooling_pallas(q, k, v, shape, interpret=False, tiling=big)
    # The default tiling always fits, also on a GPU with less shared memory (stages are dropped first).
    monkeypatch.setattr(pooling, "gpu_shared_memory_limit", lambda: 101376)
    for hd, dt in ((256, jnp.bfloat16), (128, jnp.float32), (256, jnp.float32)):
        s = Case(1, 256, 256, 1, 1, hd, 128, True, None, None, jnp.dtype(dt).name, 0)
        t = pooling.default_tiling(s.shape(*s.arrays()[:3], None), dt)
        assert pooling.shared_memory_bytes(t, hd, dt) <= 101376, (hd, dt, t)


@pytest.mark.parametrize("t,s,bs,block_k,causal,lengths", [
    (192, 192, 64, 64, True, None),
    (200, 328, 64, 32, True, None),  # T < S: the offset moves each band's first query block
    (330, 330, 64, 32, True, [150, 330]),  # lengths, a partial last block
    (128, 384, 128, 64, True, None),  # block 128, two key tiles per block
    (300, 300, 64, 64, False, [50, 300]),  # non-causal: one band
    (640, 640, 64, 64, True, [640, 333]),
])
def test_rowmax_epilogue_bands_equal_one_band(t, s, bs, block_k, causal, lengths):
    """The one-pass epilogue reads a causal buffer in bands of key blocks, each from its first seeing query block
    on: bit for bit what one band over the whole buffer gives, for any band count, with rows before a band's first
    query block left 0 (no row there sees it)."""
    b = 1 if lengths is None else len(lengths)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    q = jax.ShapeDtypeStruct((b, t, 4, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, s, 2, 64), jnp.float32)
    sh = check_attention_inputs(q, kv, kv, causal=causal, block_size=bs, sm_scale=None, lengths=lengths)
    tiles = pooling.Tiling(block_q=64, block_k=block_k, num_warps=4, num_stages=2)
    t_pad = sh.nq * bs
    rowmax = jax.random.normal(jax.random.key(0), (b, 4, sh.nk * bs // block_k, t_pad)) * 3
    lse2 = jax.random.normal(jax.random.key(1), (b, 4, t_pad)) + 4
    whole = np.asarray(pooling._pool_rowmax(rowmax, lse2, lengths, sh, tiles, bands=1))
    assert whole.shape == (b, 4, sh.nq, sh.nk) and (whole > 0).any()
    if causal:  # no row of query block i sees key block j > i + offset
        blocks = np.arange(sh.nq)[:, None] * bs + bs - 1 + (s - t) < np.arange(sh.nk)[None, :] * bs
        assert (whole[:, :, blocks] == 0).all()
    for bands in (3, 100):  # (8 is the default: the hopper and one-pass tests run it)
        np.testing.assert_array_equal(np.asarray(pooling._pool_rowmax(rowmax, lse2, lengths, sh, tiles, bands=bands)),
                                      whole)
