"""Input validation shared by every attention implementation.

Every user-facing error is a :class:`KernelInputError` (a ``ValueError``) that names the
argument, the bad value and what was expected, so a bad call fails here and never deep in XLA.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

HEAD_DIMS = (32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)
FLOAT_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


class KernelInputError(ValueError):
    """Bad arguments to an attention kernel."""


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Static facts about one attention call, derived from validated inputs."""

    batch: int
    q_len: int  # T
    kv_len: int  # S
    q_heads: int  # Hq
    kv_heads: int  # Hkv
    head_dim: int  # D
    block_size: int
    causal: bool
    sm_scale: float

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def nq(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def nk(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def block_offset(self) -> int:
        """Causal offset (S - T) in blocks: query block i sees key blocks <= i + block_offset."""
        return (self.kv_len - self.q_len) // self.block_size


def _shape(x) -> tuple:
    return tuple(getattr(x, "shape", ()))


def check_attention_inputs(q, k, v, *, causal, block_size, sm_scale, lengths) -> AttentionShape:
    """Validates q `[B,T,Hq,D]`, k and v `[B,S,Hkv,D]` and the options; returns their shape facts."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise KernelInputError(f"{name} must be an array, got {type(x).__name__}")
        if len(x.shape) != 4:
            raise KernelInputError(
                f"{name} must have 4 dimensions [batch, seq, heads, head_dim], got shape {_shape(x)}"
            )
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise KernelInputError(
                f"{name} has dtype {jnp.dtype(x.dtype).name}; expected one of float16, bfloat16, float32 (float64 for references)"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise KernelInputError(
            f"q, k and v must share one dtype, got q {jnp.dtype(q.dtype).name}, k {jnp.dtype(k.dtype).name}, v {jnp.dtype(v.dtype).name}"
        )
    if k.shape != v.shape:
        raise KernelInputError(f"k and v must have the same shape, got k {_shape(k)} and v {_shape(v)}")
    b, t, hq, d = q.shape
    bk, s, hkv, dk = k.shape
    if bk != b:
        raise KernelInputError(f"q and k must have the same batch size, got q {_shape(q)} and k {_shape(k)}")
    if dk != d:
        raise KernelInputError(f"q and k must have the same head_dim, got q {_shape(q)} and k {_shape(k)}")
    if d not in HEAD_DIMS:
        raise KernelInputError(f"head_dim {d} (last dimension of q) is not supported; expected one of {HEAD_DIMS}")
    if hkv == 0 or hq % hkv:
        raise KernelInputError(
            f"the number of query heads ({hq}, q {_shape(q)}) must be a multiple of the number of key/value heads ({hkv}, k {_shape(k)})"
        )
    if t == 0 or s == 0 or b == 0:
        raise KernelInputError(f"empty inputs are not supported: q {_shape(q)}, k {_shape(k)}")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise KernelInputError(f"block_size must be one of {BLOCK_SIZES}, got {block_size!r}")
    if not isinstance(causal, (bool, np.bool_)):
        raise KernelInputError(f"causal must be a bool, got {causal!r}")
    if causal:
        if t > s:
            raise KernelInputError(
                f"causal attention needs q_len <= kv_len (queries are the last T of the S positions), got T={t} (q) > S={s} (k)"
            )
        if (s - t) % block_size:
            raise KernelInputError(
                f"causal attention with q_len < kv_len needs the offset S - T = {s - t} to be a multiple of block_size={block_size} (T={t}, S={s})"
            )
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    else:
        try:
            sm_scale = float(sm_scale)
        except (TypeError, ValueError):
            raise KernelInputError(f"sm_scale must be a positive Python float, got {sm_scale!r}") from None
        if not math.isfinite(sm_scale) or sm_scale <= 0:
            raise KernelInputError(f"sm_scale must be a positive finite float, got {sm_scale!r}")
    if lengths is not None:
        if not hasattr(lengths, "shape") or _shape(lengths) != (b,):
            raise KernelInputError(f"lengths must be an int32 array of shape [batch]=({b},), got shape {_shape(lengths)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise KernelInputError(f"lengths must be an integer array, got dtype {jnp.dtype(lengths.dtype).name}")
        if t != s:
            raise KernelInputError(f"lengths (right padding) needs q_len == kv_len, got T={t} (q) and S={s} (k)")
    return AttentionShape(b, t, s, hq, hkv, d, int(block_size), bool(causal), float(sm_scale))


def check_block_mask(block_mask, shape: AttentionShape) -> int:
    """Validates a bool block mask `[B, Hm, nq, nk]` with Hm in {Hq, Hkv}; returns Hm."""
    if not hasattr(block_mask, "shape") or not hasattr(block_mask, "dtype"):
        raise KernelInputError(f"block_mask must be a bool array, got {type(block_mask).__name__}")
    if jnp.dtype(block_mask.dtype) != jnp.dtype(jnp.bool_):
        raise KernelInputError(f"block_mask must have dtype bool, got {jnp.dtype(block_mask.dtype).name}")
    expected = (shape.batch, None, shape.nq, shape.nk)
    bm = _shape(block_mask)
    if len(bm) != 4 or bm[0] != shape.batch or bm[2:] != (shape.nq, shape.nk) or bm[1] not in (shape.q_heads, shape.kv_heads):
        raise KernelInputError(
            f"block_mask must have shape [batch, heads, nq, nk] = ({expected[0]}, {shape.q_heads} or {shape.kv_heads}, "
            f"{shape.nq}, {shape.nk}) for T={shape.q_len}, S={shape.kv_len}, block_size={shape.block_size}; got {bm}"
        )
    return bm[1]
