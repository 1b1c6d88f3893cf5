"""The Hopper (Mosaic GPU) block-sparse backward: Mosaic GPU interpret mode on the CPU against the portable
backward (same residuals, same cotangent), CUDA cross-lowering at the production shape, and (marked `gpu`)
the compiled kernels on an H100/H200."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seerjax.kernels import block_sparse as bsp
from seerjax.kernels import hopper, hopper_bwd
from seerjax.kernels.checks import check_attention_inputs

from sparse_cases import random_block_mask

pytestmark = pytest.mark.skipif(hopper.plgpu is None, reason="jax build without Pallas Mosaic GPU")

CASES = [
    # b, t, s, hq, hkv, d, causal, lengths, dtype, per_query_head_mask, density
    pytest.param((1, 192, 192, 4, 2, 64, True, False, "bfloat16", False, 0.6), id="kv-mask"),
    pytest.param((1, 150, 150, 2, 1, 64, True, True, "float16", True, 0.5), id="q-mask-lengths-partial"),
    pytest.param((1, 128, 256, 2, 2, 64, True, False, "bfloat16", True, 0.7), id="T<S", marks=pytest.mark.slow),
    pytest.param((1, 128, 96, 2, 1, 64, False, False, "bfloat16", False, 0.8), id="noncausal",
                 marks=pytest.mark.slow),
]


def _problem(case, seed, *, interpret: bool):
    b, t, s, hq, hkv, d, causal, use_lengths, dtype, per_q, density = case
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(seed)

    def normal(*dims):
        return jnp.asarray(rng.standard_normal(dims, dtype=np.float32)).astype(dt)

    q, k, v, do = normal(b, t, hq, d), normal(b, s, hkv, d), normal(b, s, hkv, d), normal(b, t, hq, d)
    lengths = None
    if use_lengths:
        lengths = jnp.asarray(rng.integers(1, t + 1, size=b), jnp.int32).at[0].set(t - 37)
    sh = check_attention_inputs(q, k, v, causal=causal, block_size=64, sm_scale=None, lengths=lengths)
    mask = jnp.asarray(random_block_mask(rng, sh, hq if per_q else hkv, density))
    pplan = bsp.make_plan(mask, sh, lengths, q.dtype, interpret=interpret)
    return sh, q, k, v, do, mask, lengths, pplan


@pytest.mark.parametrize("case", CASES)
def test_matches_portable_backward_in_interpret_mode(case):
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:
        pytest.skip(f"Mosaic GPU interpret mode not importable in this jax: {err}")
    sh, q, k, v, do, mask, lengths, pplan = _problem(case, seed=3, interpret=True)
    _, residuals = bsp._forward(q, k, v, mask, lengths, pplan, False)
    want = bsp._backward(pplan, False, residuals, do)
    plan = hopper_bwd.BwdPlan(sh, int(mask.shape[1]), lengths is not None)
    gpu_interpret.reset_gpu_interpret_mode_state()
    try:
        got = hopper_bwd.backward_hopper(plan, residuals, do, interpret=InterpretGPUParams(detect_races=True))
        got = [np.asarray(x, np.float32) for x in got]
        assert not gpu_interpret.get_races().races_found
    finally:
        gpu_interpret.reset_gpu_interpret_mode_state()
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        w = np.asarray(w, np.float32)
        assert np.isfinite(g).all(), name
        assert np.abs(g - w).max() <= 2e-2 * max(np.abs(w).max(), 1e-6), (name, np.abs(g - w).max(), np.abs(w).max())


@pytest.mark.parametrize("mask_heads", [8, 32])
def test_lowers_for_cuda_at_production_shape(mask_heads):
    b, t, hq, hkv, d = 1, 32768, 32, 8, 128
    q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    sh = check_attention_inputs(q, kv, kv, causal=True, block_size=64, sm_scale=None, lengths=None)
    mask = jax.ShapeDtypeStruct((b, mask_heads, sh.nq, sh.nk), jnp.bool_)
    assert hopper_bwd.hopper_bwd_supported(sh, mask_heads, jnp.bfloat16)
    pplan = bsp.make_plan(mask, sh, None, jnp.bfloat16, interpret=False)
    plan = hopper_bwd.BwdPlan(sh, mask_heads, False)

    def grads(q, k, v, m, do):
        _, residuals = bsp._forward(q, k, v, m, None, pplan, False)
        return hopper_bwd.backward_hopper(plan, residuals, do)

    text = jax.jit(grads).trace(q, kv, kv, mask, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2  # dq, dk/dv


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c.values[0] for c in CASES] + [(1, 8192, 8192, 8, 2, 128, True, False, "bfloat16",
                                                                   False, 0.1)])
def test_matches_portable_backward_on_gpu(case):
    if not hopper.is_hopper_device():
        pytest.skip("needs a Hopper GPU")
    sh, q, k, v, do, mask, lengths, pplan = _problem(case, seed=5, interpret=False)
    _, residuals = bsp._forward(q, k, v, mask, lengths, pplan, False)
    want = bsp._backward(pplan, False, residuals, do)
    plan = hopper_bwd.BwdPlan(sh, int(mask.shape[1]), lengths is not None)
    got = jax.jit(lambda r, g: hopper_bwd.backward_hopper(plan, r, g))(residuals, do)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.abs(g - w).max() <= 2e-2 * max(np.abs(w).max(), 1e-6), name
