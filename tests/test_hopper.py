"""Hopper (Mosaic GPU) block-sparse forward: CPU cross-lowering checks and GPU comparisons.

On CPU the kernel cannot run (Mosaic GPU kernels have no CPU interpret path here), but the whole
Pallas -> Mosaic GPU lowering does run on a CPU host with `lower(lowering_platforms=("cuda",))`: layout
inference, wgmma operand shapes and swizzles, TMA slicing. What stays unchecked without a GPU is the
final compile of that module (LLVM -> PTX -> ptxas: registers, shared memory limits), done by the CUDA
plugin at XLA compile time, and of course the values: the `gpu`-marked tests check those
(`pytest -m gpu tests/test_hopper.py` on the device machine).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seerjax.kernels import block_sparse as bsp
from seerjax.kernels import hopper
from seerjax.kernels import reference
from seerjax.kernels.checks import check_attention_inputs

from sparse_cases import assert_matches, random_block_mask

pytestmark = pytest.mark.skipif(hopper.plgpu is None, reason="jax build without Pallas Mosaic GPU")


def _shape(b, t, s, hq, hkv, d, bs, *, causal=True, lengths=False, dtype=jnp.bfloat16):
    q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
    kv = jax.ShapeDtypeStruct((b, s, hkv, d), dtype)
    n = jax.ShapeDtypeStruct((b,), jnp.int32) if lengths else None
    return q, kv, n, check_attention_inputs(q, kv, kv, causal=causal, block_size=bs, sm_scale=None, lengths=n)


def _lower(q, kv, lengths, shape, mask_heads, monkeypatch, **launch):
    """Lowers the kernel for CUDA on this host; returns (StableHLO text, Mosaic GPU module texts)."""
    from jax._src.pallas.mosaic_gpu import pallas_call_registration as registration

    modules = []
    real = registration.lowering.lower_pipelined_jaxpr_to_module

    def capture(*args, **kwargs):
        result = real(*args, **kwargs)
        modules.append(str(result.module.operation))
        return result

    monkeypatch.setattr(registration.lowering, "lower_pipelined_jaxpr_to_module", capture)
    mask = jax.ShapeDtypeStruct((shape.batch, mask_heads, shape.nq, shape.nk), jnp.bool_)

    def forward(q, k, v, m, n):
        return hopper.block_sparse_attention_hopper(q, k, v, m, shape, lengths=n, **launch)

    lowered = jax.jit(forward).trace(q, kv, kv, mask, lengths).lower(lowering_platforms=("cuda",))
    return lowered.as_text(), modules


def _check_module(stablehlo: str, modules: list, shape, dtype: str, keys_per_step: int | None = None):
    assert stablehlo.count("custom_call @mosaic_gpu") == 1
    assert len(modules) == 1
    (module,) = modules
    d, bs = shape.head_dim, keys_per_step or shape.block_size
    wgmma = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\.", module)
    shapes = {m for m, _ in wgmma}
    assert f"m64n{bs}k16" in shapes, shapes  # S = Q K^T: 64 rows x block keys
    assert f"m64n{d}k16" in shapes, shapes  # O += P V: 64 rows x head_dim
    assert {t for _, t in wgmma} == {dtype}
    assert "nvvm.cp.async.bulk.tensor.shared.cluster.global" in module  # TMA loads (Q, K, V)
    assert "nvvm.cp.async.bulk.tensor.global.shared.cta" in module  # TMA store (out)
    assert "nvvm.mbarrier.try_wait.parity" in module


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------


def test_supported_shapes():
    _, _, _, sh = _shape(1, 1024, 1024, 32, 8, 128, 64)
    assert hopper.hopper_supported(sh, 8, jnp.bfloat16)
    assert hopper.hopper_supported(sh, 32, jnp.float16)
    assert not hopper.hopper_supported(sh, 32, jnp.float32)
    assert not hopper.hopper_supported(sh, 4, jnp.bfloat16)
    for d, bs, ok in ((64, 64, True), (64, 128, True), (128, 128, True), (256, 64, False), (128, 32, False),
                      (32, 64, False)):
        _, _, _, sh = _shape(1, 512, 512, 4, 2, d, bs)
        assert hopper.hopper_supported(sh, 2, jnp.bfloat16) is ok, (d, bs)
    _, _, _, sh = _shape(1, 512, 512, 4, 2, 256, 64)
    with pytest.raises(ValueError, match="head_dim"):
        q = jnp.zeros((1, 512, 4, 256), jnp.bfloat16)
        kv = jnp.zeros((1, 512, 2, 256), jnp.bfloat16)
        hopper.block_sparse_attention_hopper(q, kv, kv, jnp.ones((1, 2, 8, 8), bool), sh)


@pytest.mark.parametrize("causal,lengths,t,s", [(True, False, 300, 300), (True, False, 200, 328),
                                                 (True, True, 333, 333), (False, False, 250, 190)])
def test_row_lists_have_no_masked_prefix(causal, lengths, t, s):
    """The kernel walks entries [0, hi) without element mask and [hi, count) with it, so it relies on
    lo == 0 in the row lists (masked tiles are a suffix); checked on random masks."""
    rng = np.random.default_rng(0)
    _, _, n, sh = _shape(2, t, s, 4, 2, 64, 64, causal=causal, lengths=lengths)
    for heads, density in ((2, 0.3), (4, 0.7), (4, 1.0)):
        mask = jnp.asarray(random_block_mask(rng, sh, heads, density))
        lens = jnp.asarray(rng.integers(0, t + 1, size=2), jnp.int32) if lengths else None
        visible, full = bsp.block_tables(mask, sh, lens)
        _, spans = bsp.compact_block_lists(visible, full)
        assert np.all(np.asarray(spans[..., 0]) == 0)


@pytest.mark.parametrize("mask_heads", ["kv", "q"])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_production_shape_lowers_for_cuda(mask_heads, with_lengths, monkeypatch):
    """Llama-3-8B at 32k: B 1, T 32768, 32 q / 8 kv heads, D 128, bf16, block 64."""
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64, lengths=with_lengths)
    heads = 8 if mask_heads == "kv" else 32
    text, modules = _lower(q, kv, n, sh, heads, monkeypatch)
    _check_module(text, modules, sh, "bf16")
    plan = hopper.make_hopper_plan(sh, heads, with_lengths)
    # per-KV-head: 2 heads of a group per CTA (2 CTAs per list row); per-query-head block 64: 1 consumer.
    assert (plan.consumers, plan.ctas_per_row) == ((2, 2) if mask_heads == "kv" else (1, 1))
    assert hopper.smem_bytes(plan) <= 227 * 1024


def test_pingpong_lowers_for_cuda_at_production_shape(monkeypatch):
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    text, modules = _lower(q, kv, n, sh, 8, monkeypatch, consumers=2, pingpong=True)
    _check_module(text, modules, sh, "bf16")


@pytest.mark.parametrize("mask_heads", [32])  # (per-KV-head masks: test_tuned_launch_choices_and_lowering)
def test_paired_blocks_and_fast_schedule_lower_for_cuda_at_production_shape(mask_heads, monkeypatch):
    """128-key steps from two 64-blocks, the next K waited for under P V, no automatic barriers, a persistent
    grid of 132 CTAs (an H100's SMs)."""
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    launch = dict(pair_blocks=True, early_wait=True, auto_barriers=False, persistent=132)
    text, modules = _lower(q, kv, n, sh, mask_heads, monkeypatch, **launch)
    _check_module(text, modules, sh, "bf16", keys_per_step=128)  # S = Q Kᵀ over 128 keys
    plan = hopper.make_hopper_plan(sh, mask_heads, False, **launch)
    assert plan.per_step == 2 and hopper.smem_bytes(plan) <= 227 * 1024


def test_overlap_lowers_for_cuda_at_production_shape(monkeypatch):
    """Intra-warpgroup overlap (S of the next step and P V of this one in flight together) with pairs on the
    persistent grid; the option's checks."""
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    launch = dict(consumers=2, pair_blocks=True, auto_barriers=False, persistent=132, head_major=True,
                  late_release=True, overlap=True)
    text, modules = _lower(q, kv, n, sh, 8, monkeypatch, **launch)
    _check_module(text, modules, sh, "bf16", keys_per_step=128)
    for bad in (dict(pingpong=True), dict(early_wait=True), dict(tiles_per_wg=2)):
        with pytest.raises(ValueError, match="overlap needs"):
            hopper.make_hopper_plan(sh, 8, False, consumers=2, overlap=True, **bad)


def test_two_tiles_per_warpgroup_lower_for_cuda_at_production_shape(monkeypatch):
    """Per-KV-head masks with all 4 heads of a group in one CTA (2 warpgroups × 2 tiles): one K/V stream."""
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    text, modules = _lower(q, kv, n, sh, 8, monkeypatch, consumers=2, tiles_per_wg=2)
    _check_module(text, modules, sh, "bf16")
    plan = hopper.make_hopper_plan(sh, 8, False, consumers=2, tiles_per_wg=2)
    assert plan.ctas_per_row == 1 and hopper.smem_bytes(plan) <= 227 * 1024


@pytest.mark.parametrize(
    "b,t,s,hq,hkv,d,bs,causal,lengths,dtype,mask_heads",
    [
        (2, 1000, 1000, 4, 2, 64, 64, True, True, "float16", 4),  # partial block, lengths, per-q-head
        (1, 512, 640, 8, 2, 128, 128, True, False, "bfloat16", 8),  # T < S, block 128, per-q-head: 2 halves
        (1, 384, 384, 8, 2, 128, 128, True, False, "bfloat16", 2),  # block 128, per-kv-head: 2x4 tiles
        (1, 300, 200, 6, 2, 64, 64, False, False, "bfloat16", 2),  # non-causal, G 3: 1 consumer
        (1, 256, 256, 2, 2, 128, 64, False, False, "float16", 2),  # no element mask at all
    ],
)
def test_variants_lower_for_cuda(b, t, s, hq, hkv, d, bs, causal, lengths, dtype, mask_heads, monkeypatch):
    dt = jnp.dtype(dtype)
    q, kv, n, sh = _shape(b, t, s, hq, hkv, d, bs, causal=causal, lengths=lengths, dtype=dt)
    text, modules = _lower(q, kv, n, sh, mask_heads, monkeypatch)
    _check_module(text, modules, sh, "bf16" if dtype == "bfloat16" else "f16")


def test_stages_and_consumers_options(monkeypatch):
    q, kv, n, sh = _shape(1, 512, 512, 8, 2, 128, 64)
    with pytest.raises(ValueError, match="stages"):
        hopper.make_hopper_plan(sh, 2, False, stages=1)
    with pytest.raises(ValueError, match="consumers"):
        hopper.make_hopper_plan(sh, 8, False, consumers=2)  # per-q-head, block 64: 1 tile per list row
    plan = hopper.make_hopper_plan(sh, 2, False, stages=3, consumers=1)
    assert plan.ctas_per_row == 4
    plan = hopper.make_hopper_plan(sh, 2, False, consumers=2, tiles_per_wg=2)
    assert plan.ctas_per_row == 1 and plan.tiles_per_cta == 4
    assert hopper.smem_bytes(plan) == 2 * (4 * 64 * 128 + 2 * 2 * 64 * 128)
    with pytest.raises(ValueError, match="tiles_per_wg"):
        hopper.make_hopper_plan(sh, 8, False, tiles_per_wg=2)  # per-q-head, block 64: 1 tile per list row
    with pytest.raises(ValueError, match="tiles_per_wg"):
        hopper.make_hopper_plan(sh, 2, False, tiles_per_wg=3)
    with pytest.raises(ValueError, match="pingpong"):
        hopper.make_hopper_plan(sh, 2, False, consumers=1, pingpong=True)
    with pytest.raises(ValueError, match="pingpong"):
        hopper.make_hopper_plan(sh, 2, False, consumers=2, tiles_per_wg=2, pingpong=True)
    with pytest.raises(ValueError, match="pair_blocks"):
        hopper.make_hopper_plan(sh, 2, False, consumers=2, tiles_per_wg=2, pair_blocks=True)
    assert hopper.make_hopper_plan(sh, 2, False, emit_stats=True, pair_blocks=True, auto_barriers=False).per_step == 2
    assert hopper.make_hopper_plan(sh, 2, False, emit_stats=True, persistent=132, late_release=True).persistent == 132
    with pytest.raises(ValueError, match="late_release"):
        hopper.make_hopper_plan(sh, 2, False, late_release=True)  # not persistent
    with pytest.raises(ValueError, match="persistent"):
        hopper.make_hopper_plan(sh, 2, False, persistent=-1)
    with pytest.raises(ValueError, match="head_major"):
        hopper.make_hopper_plan(sh, 2, False, head_major=True)
    plan = hopper.make_hopper_plan(sh, 2, False, consumers=2, pair_blocks=True, persistent=132)
    assert hopper.smem_bytes(plan) == 2 * (2 * 2 * 64 * 128 + 2 * 2 * 2 * 64 * 128) <= 227 * 1024
    _, _, _, sh128 = _shape(1, 512, 512, 8, 2, 128, 128)
    with pytest.raises(ValueError, match="pair_blocks"):
        hopper.make_hopper_plan(sh128, 2, False, pair_blocks=True)
    plan = hopper.make_hopper_plan(sh, 2, False, consumers=2, pair_blocks=True)
    assert hopper.smem_bytes(plan) == 2 * (2 * 64 * 128 + 2 * 2 * 2 * 64 * 128)


# --------------------------------------------------------------------------------------------------
# CPU: Mosaic GPU interpret mode (jax's private InterpretGPUParams) runs the kernel's warpgroups, TMA
# copies and mbarriers on the CPU, with its race detector, NaN-filled fresh buffers (an unwritten output
# tile fails the finiteness check) and a check that every barrier phase was observed. Its wgmma accepts
# neither a transposed nor a register operand, so there the two products are plain dots: everything but
# the wgmma calls (and register layouts) is exercised.
# --------------------------------------------------------------------------------------------------

INTERPRET_CASES = [
    # b, t, s, hq, hkv, d, bs, causal, lengths, dtype, per_query_head_mask, density, stages, consumers
    pytest.param((1, 192, 192, 4, 2, 64, 64, True, False, "bfloat16", False, 0.6, None, None), id="kv-mask"),
    pytest.param((2, 200, 200, 2, 1, 64, 64, True, True, "float16", True, 0.5, None, None), id="q-mask-lengths"),
    pytest.param((1, 128, 256, 4, 1, 64, 128, True, False, "bfloat16", True, 0.7, None, None), id="bs128-T<S"),
    pytest.param((1, 256, 256, 2, 1, 64, 128, True, False, "bfloat16", False, 0.7, 3, None), id="bs128-3stages",
                 marks=pytest.mark.slow),
    pytest.param((1, 150, 100, 3, 1, 64, 64, False, False, "bfloat16", False, 0.8, None, None), id="noncausal-G3",
                 marks=pytest.mark.slow),
    pytest.param((1, 256, 256, 2, 2, 64, 64, False, False, "float16", False, 1.0, 2, None), id="unmasked",
                 marks=pytest.mark.slow),
    pytest.param((1, 256, 256, 4, 2, 64, 64, True, False, "bfloat16", False, 0.5, 2, 1), id="1-consumer",
                 marks=pytest.mark.slow),
    # ..., tiles_per_wg: two query tiles per compute warpgroup
    pytest.param((1, 256, 256, 8, 2, 64, 64, True, True, "bfloat16", False, 0.5, None, 2, 2), id="kv-mask-G4-2x2"),
    # ..., pingpong: the two compute warpgroups take turns on the tensor cores
    pytest.param((1, 200, 200, 4, 2, 64, 64, True, True, "bfloat16", False, 0.5, None, 2, 1, True), id="pingpong", marks=pytest.mark.slow),
]


# The schedule options (pair_blocks: two list entries per step, an odd count's last one padded and masked;
# early_wait; no automatic barriers), alone and together with the launch options.
FAST = dict(pair_blocks=True, early_wait=True, auto_barriers=False)
SCHEDULE_CASES = [
    pytest.param((1, 256, 256, 4, 2, 64, 64, True, True, "bfloat16", False, 0.5), FAST, id="kv-mask-lengths-fast"),
    pytest.param((1, 256, 256, 2, 2, 64, 64, False, False, "float16", False, 0.6), FAST,
                 id="unmasked-odd-counts-fast", marks=pytest.mark.slow),
    # persistent CTAs: several items each (ring and Q buffers running on across items), and more CTAs than items
    pytest.param((1, 256, 256, 4, 2, 64, 64, True, True, "bfloat16", False, 0.5), dict(FAST, pingpong=True, persistent=3),
                 id="persistent-fast-pingpong", marks=pytest.mark.slow),
    pytest.param((2, 256, 256, 8, 2, 64, 64, True, True, "bfloat16", False, 0.5),
                 dict(FAST, pingpong=True, persistent=3, head_major=True, late_release=True),
                 id="persistent-head-major-late-release-G4-batch2"),
    pytest.param((2, 200, 200, 2, 1, 64, 64, True, True, "float16", True, 0.5),
                 dict(persistent=4, stages=3, early_wait=True), id="persistent-q-mask-early-wait", marks=pytest.mark.slow),
    pytest.param((1, 128, 128, 2, 1, 64, 64, True, False, "bfloat16", False, 0.7),
                 dict(FAST, persistent=5, late_release=True), id="persistent-idle-ctas-late-release"),
    # intra-warpgroup overlap: pairs (odd counts padded), an empty row, persistent with late release; and one block
    # per step on a plain grid with lengths
    pytest.param((1, 256, 256, 4, 2, 64, 64, True, True, "bfloat16", False, 0.5),
                 dict(consumers=2, pair_blocks=True, auto_barriers=False, overlap=True, persistent=3,
                      late_release=True), id="overlap-pairs-persistent"),
    pytest.param((2, 200, 200, 2, 1, 64, 64, True, True, "float16", False, 0.6), dict(overlap=True),
                 id="overlap-single-blocks-lengths", marks=pytest.mark.slow),
]


def _interpreted(run):
    """`run(interpret_params)` in Mosaic GPU interpret mode with the race detector; its outputs as float32 numpy
    arrays (a tuple, or one array). Skips where jax's private interpret mode does not import."""
    try:  # private jax modules (same paths in 0.10.2 and 0.11.x)
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as gpu_interpret
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as err:
        pytest.skip(f"Mosaic GPU interpret mode not importable in this jax: {err}")
    gpu_interpret.reset_gpu_interpret_mode_state()
    try:
        out = run(InterpretGPUParams(detect_races=True))
        out = [np.asarray(x, np.float32) for x in out] if isinstance(out, tuple) else np.asarray(out)
        assert not gpu_interpret.get_races().races_found
    finally:
        gpu_interpret.reset_gpu_interpret_mode_state()
    return out


@pytest.mark.parametrize("case,launch", SCHEDULE_CASES)
def test_schedule_options_match_reference_in_interpret_mode(case, launch):
    sh, q, k, v, mask, lengths = _random_problem(case, seed=2)
    # An empty list row in the middle of every head (a persistent CTA must pass an item with no steps
    # without its compute warpgroups drifting apart).
    mask = mask.at[:, :, sh.nq // 2].set(False)
    counts = np.asarray(mask).sum(-1)
    assert (counts % 2 == 1).any()  # an odd count's single-block last step is exercised
    out = _interpreted(lambda params: hopper.block_sparse_attention_hopper(
        q, k, v, mask, sh, lengths=lengths, interpret=params, **launch))
    _check(out, _reference(sh, q, k, v, mask, lengths), sh, case[9], case)


def _random_problem(case, seed):
    b, t, s, hq, hkv, d, bs, causal, use_lengths, dtype, per_q, density = case[:12]
    dt = jnp.dtype(dtype)
    _, _, _, sh = _shape(b, t, s, hq, hkv, d, bs, causal=causal, lengths=use_lengths, dtype=dt)
    rng = np.random.default_rng(seed)

    def normal(*dims):
        return jnp.asarray(rng.standard_normal(dims, dtype=np.float32)).astype(dt)

    q, k, v = normal(b, t, hq, d), normal(b, s, hkv, d), normal(b, s, hkv, d)
    mask = jnp.asarray(random_block_mask(rng, sh, hq if per_q else hkv, density))  # incl. empty rows
    lengths = None
    if use_lengths:
        lengths = jnp.asarray(rng.integers(0, t + 1, size=b), jnp.int32)
        lengths = lengths.at[0].set(t - 37 if t > 37 else t)  # a query block cut by the length
    return sh, q, k, v, mask, lengths


def _reference(sh, q, k, v, mask, lengths):
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    fn = jax.jit(lambda q, k, v, m, n: reference.block_sparse_attention_reference(f32(q), f32(k), f32(v), m, sh, n))
    return np.asarray(fn(q, k, v, mask, lengths))


def _check(out, want, sh, dtype, context):
    out = np.asarray(out)
    assert_matches({"out": out}, {"out": want}, jnp.dtype(dtype), sh, context=repr(context))
    # Rows with no visible key must be exact zeros (also catches unwritten output tiles).
    empty = (want == 0).all(axis=-1)
    assert np.all(out[empty] == 0)


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_matches_reference_in_interpret_mode(case):
    sh, q, k, v, mask, lengths = _random_problem(case, seed=1)
    stages, consumers, tiles_per_wg, pingpong = (*case[12:], None, None)[:4]
    out = _interpreted(lambda params: hopper.block_sparse_attention_hopper(
        q, k, v, mask, sh, lengths=lengths, stages=stages, consumers=consumers, tiles_per_wg=tiles_per_wg,
        pingpong=bool(pingpong), interpret=params))
    _check(out, _reference(sh, q, k, v, mask, lengths), sh, case[9], case)


# --------------------------------------------------------------------------------------------------
# GPU (H100/H200): values against the reference
# --------------------------------------------------------------------------------------------------

GPU_CASES = [
    # b, t, s, hq, hkv, d, bs, causal, lengths, dtype, per_query_head_mask, density
    (1, 256, 256, 4, 2, 128, 64, True, False, "bfloat16", False, 0.5),
    (2, 1000, 1000, 4, 2, 64, 64, True, True, "float16", True, 0.3),
    (2, 777, 777, 8, 2, 128, 64, True, True, "bfloat16", False, 0.3),
    (1, 512, 640, 8, 2, 128, 128, True, False, "bfloat16", True, 0.4),
    (1, 384, 384, 8, 2, 128, 128, True, False, "float16", False, 0.4),
    (1, 300, 200, 6, 2, 64, 64, False, False, "bfloat16", False, 0.6),
    (1, 512, 512, 4, 4, 128, 64, False, False, "bfloat16", True, 1.0),
    (1, 8192, 8192, 8, 2, 128, 64, True, False, "bfloat16", False, 0.1),
    (1, 8192, 8192, 8, 2, 128, 64, True, True, "bfloat16", True, 0.1),
]


def _gpu_available() -> bool:
    try:
        return any(dev.platform == "gpu" for dev in jax.devices())
    except RuntimeError:
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_on_gpu(case, seed):
    if not _gpu_available():
        pytest.skip("needs a Hopper GPU")
    sh, q, k, v, mask, lengths = _random_problem(case, seed=1000 * seed + case[1])
    out = hopper.block_sparse_attention_hopper(q, k, v, mask, sh, lengths=lengths)
    # float32 reference on the device (the [B, Hq, T, S] scores fit at 8k with 8 heads).
    _check(out, _reference(sh, q, k, v, mask, lengths), sh, case[9], case)


# Launch options on the GPU: two query tiles per compute warpgroup (all of a GQA group in one CTA; 2 warpgroups
# where the list row has 4 tiles, else 1) and the ping-pong schedule.
LAUNCH_CASES = [
    pytest.param(GPU_CASES[i], dict(consumers=2, **opt), id=f"{name}-{'-'.join(map(str, GPU_CASES[i]))}")
    for name, opt, cases in (("2-tiles-per-wg", dict(tiles_per_wg=2), (2, 4, 7)), ("pingpong", dict(pingpong=True), (0, 2, 7)))
    for i in cases
] + [
    pytest.param(GPU_CASES[i], dict(opt), id=f"{name}-{'-'.join(map(str, GPU_CASES[i]))}")
    for name, opt, cases in (
        ("fast", FAST, (0, 1, 2, 5, 6, 7, 8)),
        ("fast-pingpong", dict(FAST, consumers=2, pingpong=True), (2, 7)),
        ("early-wait", dict(early_wait=True, auto_barriers=False), (2, 8)),
        ("persistent-fast", dict(FAST, persistent=132), (0, 1, 2, 7, 8)),
        ("persistent-fast-pingpong", dict(FAST, consumers=2, pingpong=True, persistent=132), (2, 7)),
        ("persistent-few-ctas", dict(persistent=7), (2, 3)),
        ("persistent-head-major", dict(FAST, consumers=2, pingpong=True, persistent=132, head_major=True), (2, 7)),
        ("persistent-late-release", dict(FAST, consumers=2, pingpong=True, persistent=132, late_release=True), (2, 7)),
        ("overlap", dict(overlap=True), (0, 1, 2)),
        ("overlap-pairs-persistent", dict(consumers=2, pair_blocks=True, auto_barriers=False, persistent=132,
                                          head_major=True, late_release=True, overlap=True), (2, 7)),
    )
    for i in cases
]


@pytest.mark.gpu
@pytest.mark.parametrize("case,launch", LAUNCH_CASES)
def test_launch_options_on_gpu(case, launch):
    if not _gpu_available():
        pytest.skip("needs a Hopper GPU")
    sh, q, k, v, mask, lengths = _random_problem(case, seed=11)
    out = hopper.block_sparse_attention_hopper(q, k, v, mask, sh, lengths=lengths, **launch)
    _check(out, _reference(sh, q, k, v, mask, lengths), sh, case[9], case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GPU_CASES[i] for i in (1, 2, 4, 5, 7)], ids=lambda c: "-".join(map(str, c)))
def test_dispatch_entry_on_gpu_forward_and_gradients(case):
    """`implementation="hopper"`: the Hopper forward where tuned_launch takes it (per-KV-head masks; block 128),
    the Hopper backward at block 64 (on the Hopper forward's residuals, or on the Triton forward's for
    per-query-head masks), the portable backward at block 128: the values of the portable kernels."""
    if not _gpu_available():
        pytest.skip("needs a Hopper GPU")
    from seerjax.kernels import block_sparse_attention

    sh, q, k, v, mask, lengths = _random_problem(case, seed=7)
    assert hopper.is_hopper_device()
    kw = dict(causal=sh.causal, block_size=sh.block_size, lengths=lengths)
    out = block_sparse_attention(q, k, v, mask, implementation="hopper", **kw)
    _check(out, _reference(sh, q, k, v, mask, lengths), sh, case[9], case)

    # A linear loss: the same output cotangent on both paths, so the (portable) backward must agree exactly.
    do = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(block_sparse_attention(q, k, v, mask, implementation=impl, **kw) * do)

    got = jax.grad(loss("hopper"), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        # Two bf16/fp16 backward kernels (and, at block 64, different accumulation orders of dk/dv over heads).
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all() and np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


def test_dispatch_entry_is_registered_and_checks_the_device():
    from seerjax.kernels import api

    assert "hopper" in api._SPARSE
    assert not hopper.is_hopper_device(jax.devices("cpu")[0])
    assert hopper.sm_count(jax.devices("cpu")[0]) >= 1


def test_tuned_launch_choices_and_lowering(monkeypatch):
    """The dispatch's launch per mask kind, and the per-KV-head one lowers at the production shape."""
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    assert hopper.tuned_launch(sh, 32, 132) is None  # per-query-head masks at block 64: the Triton kernel
    launch = hopper.tuned_launch(sh, 8, 132)
    assert launch == dict(consumers=2, pingpong=True, pair_blocks=True, early_wait=True, auto_barriers=False,
                          persistent=132, head_major=True, late_release=True)
    text, modules = _lower(q, kv, n, sh, 8, monkeypatch, **launch)
    _check_module(text, modules, sh, "bf16", keys_per_step=128)
    _, _, _, sh3 = _shape(1, 512, 512, 6, 2, 128, 64)  # G = 3: one compute warpgroup, so no ping-pong
    assert hopper.tuned_launch(sh3, 2, 132)["pingpong"] is False
    # head-major items only where K and V of all heads overflow the L2 (8k: 32 MiB, 16k: 64 MiB)
    _, _, _, sh8k = _shape(1, 8192, 8192, 32, 8, 128, 64)
    _, _, _, sh16k = _shape(1, 16384, 16384, 32, 8, 128, 64)
    assert hopper.tuned_launch(sh8k, 8, 132)["head_major"] is False
    assert hopper.tuned_launch(sh16k, 8, 132)["head_major"] is True
    _, _, _, sh128 = _shape(1, 512, 512, 8, 2, 128, 128)
    assert hopper.tuned_launch(sh128, 2, 132) == {}
    # the pooled forward: Mosaic GPU from 8k tokens at block 64 (where it was timed), the portable kernel below
    assert hopper.tuned_pooled_launch(sh) == dict(consumers=2, pingpong=True, pair_blocks=True, early_wait=True,
                                                  auto_barriers=False)
    _, _, _, sh8k = _shape(1, 8192, 8192, 32, 8, 128, 64)
    _, _, _, sh4k = _shape(1, 4096, 4096, 32, 8, 128, 64)
    assert hopper.tuned_pooled_launch(sh8k) is not None
    assert hopper.tuned_pooled_launch(sh4k) is None and hopper.tuned_pooled_launch(sh128) is None
    _, _, _, sh32k_g3 = _shape(1, 32768, 32768, 6, 2, 128, 64)
    assert hopper.tuned_pooled_launch(sh32k_g3)["consumers"] == 1


# --------------------------------------------------------------------------------------------------
# attention_with_pooling on Hopper (emit_stats): interpret mode against the reference
# --------------------------------------------------------------------------------------------------

POOLED_CASES = [
    # b, t, s, hq, hkv, d, bs, causal, lengths, dtype
    pytest.param((1, 192, 192, 4, 2, 64, 64, True, False, "bfloat16"), id="causal-G2"),
    pytest.param((1, 128, 256, 2, 2, 64, 128, True, False, "bfloat16"), id="T<S-bs128", marks=pytest.mark.slow),
]


def _assert_pooled_outputs_match(got, want):
    """(out, pooled, lse) against the expected ones: the same shapes and infinities (equal where infinite), and
    the finite values within 2% of each output's largest magnitude."""
    for name, g, w in zip(("out", "pooled", "lse"), got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert g.shape == w.shape, name
        finite = np.isfinite(w)
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=name)
        np.testing.assert_array_equal(g[~finite], w[~finite], err_msg=name)
        assert np.abs(g[finite] - w[finite]).max() <= 2e-2 * max(np.abs(w[finite]).max(), 1e-6), name


@pytest.mark.parametrize("case,launch,budget", [
    *(pytest.param(c.values[0], None, None, marks=c.marks, id=c.id) for c in POOLED_CASES),
    # pairs (a row maximum per 64-key block; an odd count's last entry a single-block step), the early K wait and no
    # automatic barriers; with a row-max budget under one GQA group, the KV heads in chunks of one group each
    pytest.param((1, 192, 192, 4, 2, 64, 64, True, False, "bfloat16"), dict(FAST, consumers=2, pingpong=True), 1,
                 id="fast-pingpong-2-chunks"),
    # a persistent grid (row-max stage slots reused across items, buffers released late), batch 2, lengths
    pytest.param((2, 150, 150, 2, 1, 64, 64, True, True, "float16"), dict(FAST, persistent=3, late_release=True),
                 None, id="fast-persistent-late-release-lengths-partial"),
    # ping-pong on a persistent grid, items head-major (the launch timed at 128k), GQA 4, batch 2
    pytest.param((2, 256, 256, 8, 2, 64, 64, True, False, "bfloat16"),
                 dict(FAST, consumers=2, pingpong=True, persistent=3, head_major=True, late_release=True),
                 None, id="fast-pingpong-persistent-head-major-G4-batch2"),
    # row maxima stored in stages of several steps (rowmax_batch): a partial last stage, an odd count's single
    # step inside a stage, stages across a persistent CTA's items, lengths
    pytest.param((1, 256, 256, 4, 2, 64, 64, True, False, "bfloat16"),
                 dict(FAST, consumers=2, pingpong=True, rowmax_batch=2), None, id="fast-pingpong-rowmax-batch-2"),
    pytest.param((2, 300, 300, 2, 1, 64, 64, True, True, "float16"),
                 dict(FAST, persistent=3, late_release=True, rowmax_batch=3), None,
                 id="fast-persistent-rowmax-batch-3-lengths"),
])
def test_pooled_matches_reference_in_interpret_mode(case, launch, budget):
    from seerjax.kernels import api

    b, t, s, hq, hkv, d, bs, causal, use_lengths, dtype = case
    sh, q, k, v, _, lengths = _random_problem((b, t, s, hq, hkv, d, bs, causal, use_lengths, dtype, False, 1.0),
                                              seed=2 if launch is None else 3)
    extra = {} if budget is None else {"rowmax_budget": budget}
    got = _interpreted(lambda params: hopper.attention_with_pooling_hopper(
        q, k, v, sh, lengths=lengths, return_lse=True, interpret=params, launch=launch, **extra))
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = api.attention_with_pooling(f32(q), f32(k), f32(v), causal=causal, block_size=bs, lengths=lengths,
                                      return_lse=True, implementation="reference")
    _assert_pooled_outputs_match(got, want)


def test_pooled_plan_checks():
    q, kv, n, sh = _shape(1, 512, 512, 8, 2, 128, 64)
    with pytest.raises(ValueError, match="emit_stats"):
        hopper.make_hopper_plan(sh, 2, False, consumers=1, tiles_per_wg=2, emit_stats=True)
    with pytest.raises(ValueError, match="rowmax_batch=4 batches the row-max stores of emit_stats"):
        hopper.make_hopper_plan(sh, 2, False, rowmax_batch=4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="rowmax_batch must be an int"):
            hopper.make_hopper_plan(sh, 2, False, emit_stats=True, rowmax_batch=bad)
    plan = hopper.make_hopper_plan(sh, 2, False, emit_stats=True, pair_blocks=True, rowmax_batch=3)
    assert (sh.nk, plan.rowmax_blocks) == (8, 12)  # whole stages of 3 steps × 2 blocks
    q32 = jax.ShapeDtypeStruct((1, 512, 8, 128), jnp.float32)
    kv32 = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.float32)
    sh32 = check_attention_inputs(q32, kv32, kv32, causal=True, block_size=64, sm_scale=None, lengths=None)
    with pytest.raises(ValueError, match="float32"):
        hopper.attention_with_pooling_hopper(jnp.zeros(q32.shape), jnp.zeros(kv32.shape), jnp.zeros(kv32.shape), sh32)


def test_pooled_lowers_for_cuda_at_production_shape():
    q, kv, n, sh = _shape(1, 32768, 32768, 32, 8, 128, 64)
    text = jax.jit(lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, sh)).trace(
        q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1  # 2 GiB of row maxima: under the budget, one call
    launch = hopper.tuned_pooled_launch(sh)  # the dispatch's, at 128k
    q, kv, n, sh = _shape(1, 131072, 131072, 32, 8, 128, 64)
    text = jax.jit(lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, sh, launch=launch)).trace(
        q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    # 32 GiB at 128k: one GQA group's 4 GiB of row maxima per call, the 8 calls one kernel in a loop
    assert "1x4x2048x131072xf32" in text and "1x32x2048x131072xf32" not in text
    assert text.count("custom_call @mosaic_gpu") == 1 and "while" in text
    # a budget of 4 of 6 groups: equal chunks of 3 groups (12 query heads), two of them
    q, kv, n, sh = _shape(1, 8192, 8192, 24, 6, 128, 64)
    budget = 4 * sh.group * sh.nk * sh.nq * sh.block_size * 4
    text = jax.jit(lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, sh, launch=launch,
                                                                        rowmax_budget=budget)).trace(
        q, kv, kv).lower(lowering_platforms=("cuda",)).as_text()
    assert "1x12x128x8192xf32" in text and "1x16x128x8192xf32" not in text


@pytest.mark.gpu
@pytest.mark.parametrize("launch", [None, dict(FAST, consumers=2, pingpong=True),
                                    dict(FAST, consumers=2, persistent=132, head_major=True, late_release=True),
                                    dict(FAST, consumers=2, pingpong=True, rowmax_batch=8),
                                    dict(FAST, consumers=2, pingpong=True, persistent=132, late_release=True,
                                         rowmax_batch=4)],
                         ids=["first", "fast-pingpong", "fast-persistent", "fast-pingpong-rb8",
                              "fast-pingpong-persistent-rb4"])
@pytest.mark.parametrize("case", [(1, 777, 777, 8, 2, 128, 64, True, True, "bfloat16"),
                                  (1, 8192, 8192, 8, 2, 128, 64, True, False, "bfloat16")])
def test_pooled_matches_reference_on_gpu(case, launch):
    if not _gpu_available():
        pytest.skip("needs a Hopper GPU")
    from seerjax.kernels import api

    b, t, s, hq, hkv, d, bs, causal, use_lengths, dtype = case
    sh, q, k, v, _, lengths = _random_problem((b, t, s, hq, hkv, d, bs, causal, use_lengths, dtype, False, 1.0), seed=4)
    got = hopper.attention_with_pooling_hopper(q, k, v, sh, lengths=lengths, return_lse=True, launch=launch,
                                               rowmax_budget=2**20)  # (chunks of one GQA group)
    want = api.attention_with_pooling(q, k, v, causal=causal, block_size=bs, lengths=lengths, return_lse=True,
                                      implementation="pallas")
    _assert_pooled_outputs_match(got, want)


@pytest.mark.gpu
def test_pooled_default_on_hopper_matches_portable_at_16k():
    """implementation=None on sm_90+ at 16k tokens takes the Mosaic GPU pooled forward (tuned launch); it equals
    the portable one-pass kernel's outputs."""
    if not _gpu_available():
        pytest.skip("needs a Hopper GPU")
    from seerjax.kernels import api

    case = (1, 16384, 16384, 4, 2, 128, 64, True, False, "bfloat16", False, 1.0)
    sh, q, k, v, _, _ = _random_problem(case, seed=5)
    assert hopper.tuned_pooled_launch(sh) is not None and hopper.is_hopper_device()
    got = api.attention_with_pooling(q, k, v, return_lse=True)
    want = api.attention_with_pooling(q, k, v, return_lse=True, implementation="pallas")
    _assert_pooled_outputs_match(got, want)
