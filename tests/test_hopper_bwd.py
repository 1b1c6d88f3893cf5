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


def _interpreted(run):
    """`run(interpret_params)` in Mosaic GPU interpret mode with the race detector, its outputs as float32 arrays."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:
        pytest.skip(f"Mosaic GPU interpret mode not importable in this jax: {err}")
    gpu_interpret.reset_gpu_interpret_mode_state()
    try:
        out = jax.tree.map(lambda x: np.asarray(x, np.float32), run(InterpretGPUParams(detect_races=True)))
        assert not gpu_interpret.get_races().races_found
    finally:
        gpu_interpret.reset_gpu_interpret_mode_state()
    return out


def _assert_grads_close(got, want, tol=2e-2):
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape, name
        assert np.isfinite(g).all(), name
        err = np.abs(g - w).max()
        assert err <= tol * max(np.abs(w).max(), 1e-6), (name, err, np.abs(w).max())


def _plan(sh, mask, lengths, spec):
    if spec == "tuned":
        return hopper_bwd.tuned_bwd_plan(sh, int(mask.shape[1]), lengths is not None)
    return hopper_bwd.BwdPlan(sh, int(mask.shape[1]), lengths is not None, **spec)


# (case, plan): the dispatch's plan (two dq warpgroups where two heads share a list, dk/dv CTAs walking the GQA
# group with two compute warpgroups, overlapped products, delta in the dq kernel) and, on T < S, the first version
# (one dq warpgroup, per-query-head dk/dv partials summed by XLA). The tuned plan on per-KV-head masks runs in
# test_hopper_forward_residuals_in_interpret_mode; every plan runs on the GPU (GPU_PLANS).
INTERPRET_CASES = [
    pytest.param(CASES[1].values[0], "tuned", id="q-mask-lengths-partial-tuned"),
    pytest.param(CASES[2].values[0], {}, id="T<S-first", marks=CASES[2].marks),
    pytest.param(CASES[3].values[0], "tuned", id="noncausal-tuned", marks=CASES[3].marks),
]


@pytest.mark.parametrize("case,spec", INTERPRET_CASES)
def test_matches_portable_backward_in_interpret_mode(case, spec):
    sh, q, k, v, do, mask, lengths, pplan = _problem(case, seed=3, interpret=True)
    _, residuals = bsp._forward(q, k, v, mask, lengths, pplan, False)
    want = bsp._backward(pplan, False, residuals, do)
    plan = _plan(sh, mask, lengths, spec)
    got = _interpreted(lambda params: hopper_bwd.backward_hopper(
        plan, hopper_bwd.from_portable_residuals(residuals), do, interpret=params))
    _assert_grads_close(got, want)


@pytest.mark.parametrize("overlap", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["tuned", "overlap"])
def test_hopper_forward_residuals_in_interpret_mode(overlap):
    """The Hopper forward with its log-sum-exp output (the dispatch's launch on a persistent grid of 3 CTAs:
    ping-pong, late release, the LSE store of every item; or the same with intra-warpgroup overlap instead of
    ping-pong) saves what the portable forward does, and the Hopper backward on them gives the portable
    gradients."""
    case = (1, 192, 192, 4, 2, 64, True, False, "bfloat16", False, 0.6)
    sh, q, k, v, do, mask, lengths, pplan = _problem(case, seed=4, interpret=True)
    mask = mask.at[:, :, 1].set(False)  # an empty row: lse +inf, zero output and gradients
    out_want, residuals = bsp._forward(q, k, v, mask, lengths, pplan, False)
    want = bsp._backward(pplan, False, residuals, do)
    launch = hopper.tuned_launch(sh, sh.kv_heads, 3)
    assert launch["pingpong"] and launch["persistent"] == 3
    if overlap:
        launch = {k: val for k, val in launch.items() if k not in ("pingpong", "early_wait")} | {"overlap": True}
    hplan = hopper.make_hopper_plan(sh, sh.kv_heads, False, **launch)
    plan = hopper_bwd.tuned_bwd_plan(sh, sh.kv_heads, False)

    def run(params):
        out, res = hopper.forward_with_residuals(q, k, v, mask, lengths, hplan, interpret=params)
        return out, res[4], hopper_bwd.backward_hopper(plan, res, do, interpret=params)

    out, lse, got = _interpreted(run)
    lse_want = np.asarray(jnp.swapaxes(residuals[4], 1, 2))
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(lse_want))
    assert (lse[np.isinf(lse)] > 0).all() and np.isinf(lse_want[:, :, 64:128]).all()
    finite = np.isfinite(lse_want)
    assert np.abs(lse[finite] - lse_want[finite]).max() <= 1e-2 * np.abs(lse_want[finite]).max()
    np.testing.assert_allclose(out, np.asarray(out_want, np.float32), atol=2e-2 * np.abs(out).max())
    _assert_grads_close(got, want)


def test_bwd_plan_checks_and_tuned_choice():
    q = jax.ShapeDtypeStruct((1, 512, 6, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    sh = check_attention_inputs(q, kv, kv, causal=True, block_size=64, sm_scale=None, lengths=None)
    with pytest.raises(ValueError, match="dq_consumers must be 1 or 2 and divide the 3"):
        hopper_bwd.BwdPlan(sh, 2, False, dq_consumers=2)  # G = 3
    with pytest.raises(ValueError, match="dq_consumers must be 1 or 2 and divide the 1"):
        hopper_bwd.BwdPlan(sh, 6, False, dq_consumers=2)  # per-query-head masks share no list
    with pytest.raises(ValueError, match="dkdv_consumers must be 1 or 2, got 3"):
        hopper_bwd.BwdPlan(sh, 2, False, dkdv_consumers=3)
    q128 = jax.ShapeDtypeStruct((1, 512, 8, 128), jnp.bfloat16)
    kv128 = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16)
    sh128 = check_attention_inputs(q128, kv128, kv128, causal=True, block_size=64, sm_scale=None, lengths=None)
    with pytest.raises(ValueError, match="stages=3 with dq_consumers=1, dkdv_consumers=2.*use fewer stages"):
        hopper_bwd.BwdPlan(sh128, 2, False, stages=3, dkdv_consumers=2)  # two rings of 3 stages: 256 KiB
    assert max(hopper_bwd.tuned_bwd_plan(sh128, 2, False).smem_bytes()) <= hopper_bwd.SMEM_LIMIT
    with pytest.raises(ValueError, match="stages must be >= 2"):
        hopper_bwd.BwdPlan(sh, 2, False, stages=1)
    assert hopper_bwd.tuned_bwd_plan(sh, 2, False).dq_consumers == 1
    assert hopper_bwd.tuned_bwd_plan(sh, 2, False).dkdv_heads == 3
    q4 = jax.ShapeDtypeStruct((1, 512, 8, 64), jnp.bfloat16)
    sh4 = check_attention_inputs(q4, kv, kv, causal=True, block_size=64, sm_scale=None, lengths=None)
    tuned = hopper_bwd.tuned_bwd_plan(sh4, 2, True)
    assert (tuned.dq_consumers, tuned.kv_loop, tuned.auto_barriers, tuned.has_lengths) == (2, True, False, True)
    assert hopper_bwd.tuned_bwd_plan(sh4, 8, False).dq_consumers == 1


@pytest.mark.parametrize("mask_heads", [8, 32])
def test_lowers_for_cuda_at_production_shape(mask_heads):
    """The dispatch's differentiable path at 32k: the Hopper forward with its LSE (the tuned launch where the
    dispatch takes it), dq and dk/dv; and the first backward version on the portable residuals."""
    b, t, hq, hkv, d = 1, 32768, 32, 8, 128
    q = jax.ShapeDtypeStruct((b, t, hq, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    sh = check_attention_inputs(q, kv, kv, causal=True, block_size=64, sm_scale=None, lengths=None)
    mask = jax.ShapeDtypeStruct((b, mask_heads, sh.nq, sh.nk), jnp.bool_)
    assert hopper_bwd.hopper_bwd_supported(sh, mask_heads, jnp.bfloat16)
    hplan = hopper.make_hopper_plan(sh, mask_heads, False, **(hopper.tuned_launch(sh, mask_heads, 132) or {}))
    plan = hopper_bwd.tuned_bwd_plan(sh, mask_heads, False)

    def grads(q, k, v, m, do):
        _, residuals = hopper.forward_with_residuals(q, k, v, m, None, hplan)
        return hopper_bwd.backward_hopper(plan, residuals, do)

    text = jax.jit(grads).trace(q, kv, kv, mask, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dq, dk/dv
    pplan = bsp.make_plan(mask, sh, None, jnp.bfloat16, interpret=False)
    first = hopper_bwd.BwdPlan(sh, mask_heads, False)

    def first_grads(q, k, v, m, do):
        _, residuals = bsp._forward(q, k, v, m, None, pplan, False)
        return hopper_bwd.backward_hopper(first, hopper_bwd.from_portable_residuals(residuals), do)

    text = jax.jit(first_grads).trace(q, kv, kv, mask, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 2  # dq, dk/dv


GPU_PLANS = [
    pytest.param({}, id="first"),
    pytest.param("tuned", id="tuned"),
    pytest.param(dict(kv_loop=True), id="loop"),
    pytest.param(dict(auto_barriers=False, stages=3), id="noab-s3"),
    pytest.param(dict(overlap=True), id="overlap"),
    pytest.param(dict(kv_loop=True, dkdv_consumers=2, fused_delta=True), id="loop-kc2-fd"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("spec", GPU_PLANS)
@pytest.mark.parametrize("case", [c.values[0] for c in CASES] + [(1, 8192, 8192, 8, 2, 128, True, False, "bfloat16",
                                                                   False, 0.1)])
def test_matches_portable_backward_on_gpu(case, spec):
    if not hopper.is_hopper_device():
        pytest.skip("needs a Hopper GPU")
    sh, q, k, v, do, mask, lengths, pplan = _problem(case, seed=5, interpret=False)
    _, residuals = bsp._forward(q, k, v, mask, lengths, pplan, False)
    want = bsp._backward(pplan, False, residuals, do)
    plan = _plan(sh, mask, lengths, spec)
    got = jax.jit(lambda r, g: hopper_bwd.backward_hopper(plan, hopper_bwd.from_portable_residuals(r), g))(
        residuals, do)
    _assert_grads_close(got, want)
