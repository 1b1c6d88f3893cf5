"""The k-th value kernel behind TopK block selection: exactly `lax.top_k`'s k-th value, every path."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seerjax.kernels.topk import TopKError, kth_largest, kth_largest_pallas
from seerjax.selection import SelectionConfig, select_blocks

_CAP = int(os.environ.get("SEERJAX_MAX_EXAMPLES", "1000000"))


def _scores(rng, shape, kind):
    x = rng.normal(size=shape).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2  # many equal values
    elif kind == "masked":
        x[..., rng.random(shape[-1]) < 0.6] = -1e30  # most blocks invisible, as in a causal row
    elif kind == "signs":
        x = np.where(rng.random(shape) < 0.5, -0.0, 0.0).astype(np.float32) + x * (rng.random(shape) < 0.3)
    elif kind == "wide":
        x = x * np.float32(10.0) ** rng.integers(-30, 30, size=shape)
    return jnp.asarray(x)


@settings(max_examples=min(24, _CAP), deadline=None)
@given(
    rows=st.integers(1, 70),
    n=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
    kind=st.sampled_from(["normal", "ties", "masked", "signs", "wide"]),
    seed=st.integers(0, 2**16),
)
def test_kth_value_equals_top_k(rows, n, frac, kind, seed):
    rng = np.random.default_rng(seed)
    x = _scores(rng, (rows, n), kind)
    k = 1 + int(frac * (n - 1))
    want = np.asarray(jax.lax.top_k(x, k)[0][:, -1])
    for impl in ("pallas_interpret", "bisect"):
        got = np.asarray(kth_largest(x, k, implementation=impl))
        np.testing.assert_array_equal(got, want, err_msg=f"{impl}, k={k}")


def test_leading_axes_and_infinities():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 40)), jnp.float32)
    x = x.at[0, 0, 0, :30].set(-jnp.inf).at[1, 2, 4, :].set(jnp.inf)
    for k in (1, 7, 40):
        want = jax.lax.top_k(x, k)[0][..., -1]
        got = kth_largest(x, k, implementation="pallas_interpret")
        assert got.shape == (2, 3, 5)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bfloat16_scores():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(9, 77)), jnp.bfloat16)
    want = jax.lax.top_k(x.astype(jnp.float32), 5)[0][:, -1]
    np.testing.assert_array_equal(np.asarray(kth_largest(x, 5, implementation="pallas_interpret")), np.asarray(want))


@pytest.mark.parametrize("density", [0.5, 0.1])
@pytest.mark.parametrize("causal", [True, False])
def test_select_blocks_same_mask_on_every_path(density, causal):
    scores = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 20, 24)), jnp.float32)
    valid = jnp.arange(24)[None, :] < jnp.array([[24], [17]])
    cfg = SelectionConfig(density=density, keep_first=True)
    masks = [
        np.asarray(select_blocks(scores, cfg, causal=causal, key_blocks_valid=valid, implementation=impl))
        for impl in ("reference", "pallas_interpret", "bisect", None)
    ]
    for m in masks[1:]:
        np.testing.assert_array_equal(m, masks[0])


@settings(max_examples=min(8, _CAP), deadline=None)
@given(
    rows=st.integers(1, 70),
    n=st.integers(1, 200),
    kind=st.sampled_from(["normal", "ties", "masked", "signs"]),
    seed=st.integers(0, 2**16),
)
def test_per_row_k_equals_top_k_row_by_row(rows, n, kind, seed):
    """One budget per row (TopK selection gives the last rows one block more)."""
    rng = np.random.default_rng(seed)
    x = _scores(rng, (rows, n), kind)
    k = rng.integers(1, n + 1, size=rows).astype(np.int32)
    full = np.asarray(jax.lax.top_k(x, n)[0])
    want = full[np.arange(rows), k - 1]
    for impl in ("pallas_interpret", "bisect", "top_k"):
        got = np.asarray(kth_largest(x, k, implementation=impl))
        np.testing.assert_array_equal(got, want, err_msg=impl)
    traced = jax.jit(lambda x, k: kth_largest(x, k, implementation="top_k"))(x, jnp.asarray(k))
    np.testing.assert_array_equal(np.asarray(traced), want)


def test_bad_per_row_k_is_named():
    x = jnp.zeros((2, 3, 40))
    with pytest.raises(TopKError, match="shape of x without its last axis"):
        kth_largest(x, np.ones((2, 4), np.int32))
    with pytest.raises(TopKError, match=r"values in \[0, 1\]"):
        kth_largest(x, np.array([[0, 1, 1], [1, 1, 1]], np.int32))
    with pytest.raises(TopKError, match="int array"):
        kth_largest(x, np.ones((2, 3), np.float32))


@pytest.mark.parametrize("bad_k", [0, 41, 2.5, True])
def test_bad_k_is_named(bad_k):
    with pytest.raises(TopKError, match="k must be an int in"):
        kth_largest(jnp.zeros((3, 40)), bad_k)


def test_bad_dtype_and_implementation_are_named():
    with pytest.raises(TopKError, match="float array"):
        kth_largest(jnp.zeros((3, 40), jnp.int32), 2)
    with pytest.raises(TopKError, match="implementation must be"):
        kth_largest(jnp.zeros((3, 40)), 2, implementation="sort")


@pytest.mark.parametrize("t", [32768, 131072])
def test_kernel_lowers_for_cuda_at_production_shapes(t):
    """Llama-3-8B per-query-head gate scores (32 heads, block 64) at 32k and 128k tokens."""
    nb = t // 64
    scores = jax.ShapeDtypeStruct((1, 32, nb, nb), jnp.float32)
    k = max(1, int((1 - 0.9**0.5) * nb))
    lowered = jax.jit(lambda s: kth_largest_pallas(s, k)).trace(scores).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == 1
    # The selection's per-row budgets (k for most rows, k + 1 for the last ones) take the same kernel.
    per_row = np.where(np.arange(nb) >= nb // 2, k + 1, k).astype(np.int32)
    per_row = np.broadcast_to(per_row, (1, 32, nb))
    lowered = jax.jit(lambda s: kth_largest(s, per_row, implementation="pallas")).trace(scores).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("@__gpu$xla.gpu.triton") + text.count("@triton_kernel_call_ffi") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 32, 512, 512), (1, 8, 2048, 2048), (3, 77)])
def test_compiled_kernel_equals_top_k(shape):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    x = jnp.round(x * 8) / 8  # ties
    for k in (1, shape[-1] // 10 + 1, shape[-1]):
        want = jax.lax.top_k(x, k)[0][..., -1]
        np.testing.assert_array_equal(np.asarray(kth_largest(x, k, implementation="pallas")), np.asarray(want))
    per_row = jax.random.randint(jax.random.key(1), shape[:-1], 1, shape[-1] + 1)
    full = jax.lax.top_k(x, shape[-1])[0]
    want = jnp.take_along_axis(full, per_row[..., None] - 1, axis=-1)[..., 0]
    np.testing.assert_array_equal(np.asarray(kth_largest(x, per_row, implementation="pallas")), np.asarray(want))
