"""Block pooling for the gate: the Pallas kernel (interpret mode on CPU, compiled on GPU) against the XLA version."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seerjax.kernels.block_pool import (
    BlockPoolError,
    block_pool_pallas,
    default_tiles,
    pool_blocks_kernel,
    pool_blocks_xla,
)

from seerjax.gate import pool_blocks

ALL_KINDS = ("avg", "max", "min")


def _x(shape, dtype, seed=0):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3.0
    return jnp.asarray(x, dtype)


def _assert_same(got, want, kinds, d):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == np.float32
    for k, kind in enumerate(kinds):
        g, w = got[..., k * d : (k + 1) * d], want[..., k * d : (k + 1) * d]
        if kind == "avg":  # the summation order differs: float32 rounding only
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6, err_msg=kind)
        else:
            np.testing.assert_array_equal(g, w, err_msg=kind)


# (B, T, H, D, block_size, dtype, lengths): partial last blocks, T smaller than one block, lengths with 0
# and past T, every head count and head_dim of the gate's models, non-power-of-2 block and head sizes.
CASES = [
    (2, 37, 3, 4, 16, jnp.float32, [37, 20]),
    (1, 64, 1, 32, 16, jnp.float32, None),
    (2, 100, 2, 64, 32, jnp.bfloat16, None),
    (3, 90, 8, 32, 32, jnp.float32, [0, 90, 200]),
    (1, 10, 8, 128, 64, jnp.bfloat16, None),
    (2, 10, 2, 64, 128, jnp.float32, [3, 0]),
    (2, 256, 32, 32, 64, jnp.bfloat16, [256, 100]),
    (1, 300, 32, 128, 128, jnp.float32, None),
    (2, 128, 8, 128, 64, jnp.float32, None),
    (2, 200, 8, 128, 128, jnp.bfloat16, [7, 1000]),
    (1, 96, 4, 64, 16, jnp.float16, [50]),
    (2, 77, 6, 96, 48, jnp.float32, [77, 30]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}bs{c[4]}-{jnp.dtype(c[5]).name}-{c[6]}")
def test_interpret_matches_xla(case):
    b, t, h, d, bs, dtype, lengths = case
    x = _x((b, t, h, d), dtype)
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    kinds = ("max", "min", "avg") if (t + h) % 2 else ("avg", "max", "min")
    want = pool_blocks_xla(x, bs, kinds, lens)
    got = block_pool_pallas(x, bs, kinds, lens, interpret=True)
    assert got.shape == (b, -(-t // bs), h, len(kinds) * d)
    _assert_same(got, want, kinds, d)


ORDERS = [*itertools.permutations(ALL_KINDS), ("avg",), ("max",), ("min",), ("min", "max"), ("avg", "min"), ("avg", "avg")]


@pytest.mark.parametrize("kinds", ORDERS)
def test_every_kinds_order(kinds):
    x = _x((2, 45, 2, 32), jnp.bfloat16, seed=1)
    lens = jnp.asarray([45, 17], jnp.int32)
    got = pool_blocks_kernel(x, 16, kinds, lens, implementation="pallas_interpret")
    _assert_same(got, pool_blocks_xla(x, 16, kinds, lens), kinds, 32)


def test_empty_blocks_are_zero_and_infinities_pool():
    x = _x((2, 40, 2, 32), jnp.float32).at[0, :16, 0].set(-jnp.inf).at[0, 16:32, 1].set(jnp.inf)
    lens = jnp.asarray([40, 0], jnp.int32)
    got = np.asarray(block_pool_pallas(x, 16, ("max", "min"), lens, interpret=True))
    _assert_same(got, pool_blocks_xla(x, 16, ("max", "min"), lens), ("max", "min"), 32)
    np.testing.assert_array_equal(got[1], 0.0)
    np.testing.assert_array_equal(got[0, 0, 0, :32], -np.inf)


@pytest.mark.parametrize("tiles", [(1, 1, 32), (2, 4, 8), (1, 16, 64)])
def test_launch_shape_changes_nothing(tiles):
    x = _x((2, 50, 2, 64), jnp.float32, seed=2)
    lens = jnp.asarray([50, 21], jnp.int32)
    kinds = ("avg", "max", "min")
    want = pool_blocks_xla(x, 16, kinds, lens)
    _assert_same(block_pool_pallas(x, 16, kinds, lens, interpret=True, tiles=tiles, num_warps=2), want, kinds, 64)


def test_default_tiles_are_powers_of_2_that_divide():
    for bs, h, d in itertools.product((16, 32, 48, 64, 128), (1, 2, 6, 8, 32), (32, 64, 96, 128, 256)):
        ht, rows, cols = default_tiles(bs, h, d)
        for v, whole in ((ht, h), (rows, bs), (cols, d)):
            assert v & (v - 1) == 0 and whole % v == 0
        assert rows * ht * cols <= 8192
    assert default_tiles(64, 32, 128) == (2, 32, 128)  # Llama-3-8B q: 16k elements per program, 2 loads


def test_gradient_is_the_xla_gradient():
    x = _x((2, 40, 2, 32), jnp.float32, seed=3)
    lens = jnp.asarray([40, 25], jnp.int32)
    kinds = ("max", "min", "avg")
    w = _x((2, 3, 2, 96), jnp.float32, seed=4)

    def loss(f):
        return lambda x_: jnp.sum(f(x_) * w[:, : f(x_).shape[1]])

    g_xla = jax.grad(loss(lambda x_: pool_blocks_xla(x_, 16, kinds, lens)))(x)
    g_pal = jax.jit(jax.grad(loss(lambda x_: block_pool_pallas(x_, 16, kinds, lens, interpret=True))))(x)
    np.testing.assert_allclose(np.asarray(g_pal), np.asarray(g_xla), rtol=1e-6, atol=1e-7)
    g_nolen = jax.grad(loss(lambda x_: block_pool_pallas(x_[:, :32], 16, kinds, interpret=True)[:, :2]))(x)
    g_nolen_xla = jax.grad(loss(lambda x_: pool_blocks_xla(x_[:, :32], 16, kinds)[:, :2]))(x)
    np.testing.assert_allclose(np.asarray(g_nolen), np.asarray(g_nolen_xla), rtol=1e-6, atol=1e-7)


def test_vmap_and_jit():
    x = _x((3, 2, 33, 2, 32), jnp.bfloat16, seed=5)
    f = jax.jit(jax.vmap(lambda x_: block_pool_pallas(x_, 16, ("avg", "max"), interpret=True)))
    want = jax.vmap(lambda x_: pool_blocks_xla(x_, 16, ("avg", "max")))(x)
    _assert_same(f(x), want, ("avg", "max"), 32)


def test_gate_pool_blocks_dispatches_to_xla_on_cpu():
    x = _x((2, 37, 3, 32), jnp.bfloat16, seed=6)
    lens = jnp.asarray([37, 20], jnp.int32)
    kinds = ("max", "min", "avg")
    got = pool_blocks(x, 16, kinds, lens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pool_blocks_xla(x, 16, kinds, lens)))
    # and stays differentiable
    g = jax.grad(lambda x_: jnp.sum(pool_blocks(x_, 16, kinds, lens)))(x.astype(jnp.float32))
    assert g.shape == x.shape and np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("bad", [0, -16, 2.5, True, "64", None])
def test_bad_block_size_is_named(bad):
    x = jnp.zeros((1, 32, 2, 32))
    for f in (pool_blocks, pool_blocks_kernel, block_pool_pallas):
        with pytest.raises(ValueError, match="block_size"):
            f(x, bad, ("avg",))


@pytest.mark.parametrize("bad", [(), ("mean",), ("avg", "sum"), "avg", None, ["max", 3]])
def test_bad_kinds_are_named(bad):
    x = jnp.zeros((1, 32, 2, 32))
    for f in (pool_blocks, pool_blocks_kernel, block_pool_pallas):
        with pytest.raises(ValueError, match="kinds"):
            f(x, 16, bad)


def test_bad_inputs_are_named():
    x = jnp.zeros((2, 32, 2, 32))
    with pytest.raises(BlockPoolError, match="x must be"):
        pool_blocks_kernel(x[0], 16, ("avg",))
    with pytest.raises(BlockPoolError, match="float array"):
        pool_blocks_kernel(x.astype(jnp.int32), 16, ("avg",))
    with pytest.raises(BlockPoolError, match="lengths must be"):
        pool_blocks_kernel(x, 16, ("avg",), jnp.zeros((3,), jnp.int32))
    with pytest.raises(BlockPoolError, match="implementation must be"):
        pool_blocks_kernel(x, 16, ("avg",), implementation="triton")
    with pytest.raises(BlockPoolError, match="heads_tile"):
        block_pool_pallas(x, 16, ("avg",), tiles=(4, 16, 32))


def _triton_calls(stablehlo: str) -> int:
    # jax <= 0.11 emits "__gpu$xla.gpu.triton"; a newer custom-call path is named "triton_kernel_call_ffi".
    return stablehlo.count("@__gpu$xla.gpu.triton") + stablehlo.count("@triton_kernel_call_ffi")


@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize(
    "shape, kinds", [((1, 32768, 32, 128), ("avg",)), ((1, 32768, 8, 128), ("max", "min", "avg"))], ids=["q", "k"]
)
def test_kernel_lowers_for_cuda_at_production_shapes(shape, kinds, with_lengths):
    """Llama-3-8B q (32 heads) and k (8 KV heads) at 32k tokens, bf16, block 64: one Triton kernel each."""
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    lens = jax.ShapeDtypeStruct((1,), jnp.int32) if with_lengths else None
    lowered = jax.jit(lambda x_, n: block_pool_pallas(x_, 64, kinds, n)).trace(x, lens).lower(lowering_platforms=("cuda",))
    assert _triton_calls(lowered.as_text()) == 1


def test_kernel_lowers_for_cuda_with_odd_sizes_and_gradient():
    """Partial last block, non-power-of-2 block and head_dim (chunked loads), and the backward (XLA): one kernel."""
    x = jax.ShapeDtypeStruct((2, 1000, 6, 96), jnp.bfloat16)

    def grad(x_):
        return jax.grad(lambda y: jnp.sum(block_pool_pallas(y, 48, ("min", "avg", "max"))))(x_.astype(jnp.float32))

    lowered = jax.jit(grad).trace(x).lower(lowering_platforms=("cuda",))
    assert _triton_calls(lowered.as_text()) == 1


_ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_GPU, reason="needs a CUDA GPU")
class TestCompiledOnGpu:
    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}D{c[3]}bs{c[4]}-{jnp.dtype(c[5]).name}-{c[6]}")
    def test_compiled_matches_xla(self, case):
        b, t, h, d, bs, dtype, lengths = case
        x = _x((b, t, h, d), dtype)
        lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        for kinds in (("max", "min", "avg"), ("avg",), ("min", "max")):
            want = jax.jit(pool_blocks_xla, static_argnums=(1, 2))(x, bs, kinds, lens)
            got = pool_blocks_kernel(x, bs, kinds, lens, implementation="pallas")
            _assert_same(got, want, kinds, d)

    @pytest.mark.parametrize("kinds", [("avg",), ("max", "min", "avg")])
    @pytest.mark.parametrize("lengths", [None, [30001]])
    def test_production_shapes(self, kinds, lengths):
        h = 32 if kinds == ("avg",) else 8
        x = jax.random.normal(jax.random.key(0), (1, 32768, h, 128), jnp.bfloat16)
        lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
        want = jax.jit(lambda x_, n: pool_blocks_xla(x_, 64, kinds, n))(x, lens)
        got = jax.jit(lambda x_, n: pool_blocks(x_, 64, kinds, n))(x, lens)  # the gate's path: the kernel on GPU
        _assert_same(got, want, kinds, 128)

    def test_gradient_on_gpu(self):
        x = _x((2, 100, 8, 64), jnp.float32)
        lens = jnp.asarray([100, 33], jnp.int32)
        kinds = ("max", "min", "avg")
        g = jax.jit(jax.grad(lambda x_: jnp.sum(pool_blocks(x_, 32, kinds, lens) ** 2)))(x)
        g_xla = jax.jit(jax.grad(lambda x_: jnp.sum(pool_blocks_xla(x_, 32, kinds, lens) ** 2)))(x)
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_xla), rtol=1e-5, atol=1e-6)
