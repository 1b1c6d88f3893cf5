"""Shared helpers for the kernel tests: random cases, the float64 reference, error checks."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from seerjax.kernels.checks import AttentionShape, check_attention_inputs

# Max |kernel - reference| relative to max |reference|, per input dtype.
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}


# XLA CPU options that cut compile time: every hypothesis example is a new shape, hence a new
# compile, and at test sizes compiling an interpret-mode kernel costs far more than running it
# (together about 6x less compile time, run time about the same).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.cache
def _fast_compile_options() -> dict | None:
    """The options of _FAST_COMPILE this XLA knows (they are not a stable API), on CPU only."""
    if jax.default_backend() != "cpu":
        return None
    known = {}
    for name, value in _FAST_COMPILE.items():
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options={name: value})
        except Exception:  # an unknown option: XLA raises its own error type
            continue
        known[name] = value
    return known or None


def fast_jit(fn, **jit_kwargs):
    """`jax.jit` that, on CPU, compiles fast rather than well (see _FAST_COMPILE)."""
    return jax.jit(fn, compiler_options=_fast_compile_options(), **jit_kwargs)


@contextlib.contextmanager
def enable_x64():
    """float64 inside the block only (`jax.enable_x64` where it exists, else the experimental one)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:
        from jax.experimental import enable_x64 as ctx
    with ctx(True):
        yield


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem; `arrays()` draws its inputs, `shape()` validates them."""

    batch: int
    q_len: int
    kv_len: int
    kv_heads: int
    group: int
    head_dim: int
    block_size: int
    causal: bool
    lengths: tuple[int, ...] | None
    sm_scale: float | None
    dtype: str
    seed: int

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    def arrays(self):
        """q `[B,T,Hq,D]`, k, v `[B,S,Hkv,D]` in `dtype`, and lengths int32 `[B]` or None."""
        rng = np.random.default_rng(self.seed)
        dtype = jnp.dtype(self.dtype)
        q = jnp.asarray(rng.standard_normal((self.batch, self.q_len, self.q_heads, self.head_dim)), dtype)
        k = jnp.asarray(rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.head_dim)), dtype)
        v = jnp.asarray(rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.head_dim)), dtype)
        lengths = None if self.lengths is None else jnp.asarray(self.lengths, jnp.int32)
        return q, k, v, lengths

    def shape(self, q, k, v, lengths) -> AttentionShape:
        return check_attention_inputs(
            q, k, v, causal=self.causal, block_size=self.block_size, sm_scale=self.sm_scale, lengths=lengths
        )


KINDS = ("equal", "lengths", "different")


@st.composite
def attention_cases(
    draw, *, causal=None, kind=None, dtypes=("float32",), max_len=600, max_q_heads=8, sm_scales=(None, 0.05, 0.3, 1.0)
):
    """Random cases: T, S in [1, max_len] (mostly not multiples of the block), GQA groups 1/2/4/8.
    `kind` (drawn when None): "equal" T == S; "lengths" T == S with right padding; "different"
    T != S (causal: S - T a positive multiple of the block)."""
    block_size = draw(st.sampled_from((64, 16, 128, 32)))  # the production block first
    causal = draw(st.booleans()) if causal is None else causal
    kind = draw(st.sampled_from(KINDS)) if kind is None else kind

    def length(lo, hi):
        # Hypothesis favours small integers: the second range keeps long ones common, the third
        # gives whole blocks.
        whole_blocks = st.integers(1, max(1, hi // block_size)).map(lambda n: n * block_size)
        return draw(st.one_of(st.integers(lo, hi), st.integers(max(lo, hi // 4), hi), whole_blocks))

    q_len = kv_len = length(1, max_len)
    if kind == "different" and causal:
        q_len = length(1, max_len - block_size)
        kv_len = q_len + draw(st.integers(1, (max_len - q_len) // block_size)) * block_size
    elif kind == "different":
        q_len = length(1, max_len)
    batch = draw(st.integers(1, 2))
    lengths = None
    if kind == "lengths":
        one = st.one_of(st.just(0), st.just(q_len), st.integers(0, q_len))
        lengths = tuple(draw(one) for _ in range(batch))
    group = draw(st.sampled_from((1, 2, 4, 8)))
    kv_heads = draw(st.integers(1, max(1, max_q_heads // group)))
    return Case(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        kv_heads=kv_heads,
        group=group,
        head_dim=draw(st.sampled_from((32, 64, 128))),
        block_size=block_size,
        causal=causal,
        lengths=lengths,
        sm_scale=draw(st.sampled_from(sm_scales)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
    )


def reference_float64(fn, *arrays, **kwargs):
    """Calls a reference on float64 copies of the floating arrays (integers pass through)."""
    with enable_x64():
        cast = [
            None if a is None else jnp.asarray(np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a)
            for a in arrays
        ]
        out = fast_jit(fn, static_argnames=tuple(k for k in kwargs if k != "lengths"))(*cast, **kwargs)
        return jax.tree.map(lambda x: np.asarray(x, np.float64), out)


def relative_error(name: str, actual, expected) -> float:
    """max |actual - expected| / max |expected| over finite entries, after checking that
    `actual` has no NaN and is non-finite (±inf) exactly where `expected` is."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    assert not np.isnan(actual).any(), f"{name}: {np.isnan(actual).sum()} NaN (unwritten or 0/0) entries"
    finite = np.isfinite(expected)
    mismatch = np.argwhere((actual != expected) & ~finite)
    assert not mismatch.size, f"{name}: non-finite reference entries differ, e.g. at {mismatch[:5].tolist()}"
    if not finite.any():
        return 0.0
    scale = np.abs(expected[finite]).max()
    return float(np.abs(actual[finite] - expected[finite]).max() / (scale if scale > 0 else 1.0))
