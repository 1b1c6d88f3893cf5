"""Pure-jnp references: the readable specification of both attention contracts.

They materialize the full `[B, Hq, T, S]` score matrix, so they are for tests, small inputs and
CPU fallbacks. Arithmetic runs in float32, or float64 when the inputs are float64 (tests compare
kernels against a float64 reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seerjax.kernels.checks import AttentionShape


def compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def visibility(shape: AttentionShape, lengths=None) -> jax.Array:
    """Bool `[B or 1, 1, T, S]`: query t may see key s (causal bottom-right, right padding)."""
    t_idx = jnp.arange(shape.q_len)[:, None]
    s_idx = jnp.arange(shape.kv_len)[None, :]
    vis = jnp.ones((shape.q_len, shape.kv_len), bool)
    if shape.causal:
        vis = s_idx <= t_idx + (shape.kv_len - shape.q_len)
    vis = vis[None, None]
    if lengths is not None:
        lengths = lengths.astype(jnp.int32)[:, None, None, None]
        # Padding keys are invisible; padding query rows see nothing, so their output is zero.
        vis = vis & (s_idx[None, None] < lengths) & (t_idx[None, None] < lengths)
    return vis


def expand_block_mask(block_mask: jax.Array, shape: AttentionShape) -> jax.Array:
    """`[B, Hm, nq, nk]` block mask → bool `[B, Hq, T, S]` element mask."""
    hm = block_mask.shape[1]
    if hm != shape.q_heads:
        block_mask = jnp.repeat(block_mask, shape.q_heads // hm, axis=1)
    bs = shape.block_size
    m = jnp.repeat(jnp.repeat(block_mask, bs, axis=2), bs, axis=3)
    return m[:, :, : shape.q_len, : shape.kv_len]


def _scores(q, k, shape: AttentionShape) -> jax.Array:
    """Scaled logits `[B, Hq, T, S]` in the compute dtype; GQA by grouping query heads."""
    cd = compute_dtype(q.dtype)
    b, t, hq, d = q.shape
    q_btkgd = q.astype(cd).reshape(b, t, shape.kv_heads, shape.group, d)
    s_bkgts = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k.astype(cd), precision=jax.lax.Precision.HIGHEST)
    return s_bkgts.reshape(b, hq, t, shape.kv_len) * jnp.asarray(shape.sm_scale, cd)


def _softmax_attention(q, k, v, visible, shape: AttentionShape):
    """Masked softmax attention; rows with no visible key give zeros. Returns (out, probs, lse)."""
    cd = compute_dtype(q.dtype)
    logits = jnp.where(visible, _scores(q, k, shape), -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    any_visible = jnp.isfinite(row_max)
    safe_max = jnp.where(any_visible, row_max, 0.0)
    e = jnp.where(visible, jnp.exp(logits - safe_max), 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(any_visible, denom, 1.0)
    lse = jnp.where(any_visible, safe_max + jnp.log(jnp.where(any_visible, denom, 1.0)), -jnp.inf)[..., 0]
    b, t, hq, d = q.shape
    p_bkgts = probs.reshape(b, shape.kv_heads, shape.group, t, shape.kv_len)
    out = jnp.einsum("bkgts,bskd->btkgd", p_bkgts, v.astype(cd), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, hq, d).astype(q.dtype), probs, lse


def block_max_pool(probs: jax.Array, block_size: int) -> jax.Array:
    """Max of `[B, H, T, S]` over block_size × block_size tiles → `[B, H, nq, nk]` (partial tiles too)."""
    b, h, t, s = probs.shape
    nq, nk = -(-t // block_size), -(-s // block_size)
    padded = jnp.pad(probs, ((0, 0), (0, 0), (0, nq * block_size - t), (0, nk * block_size - s)))
    return padded.reshape(b, h, nq, block_size, nk, block_size).max(axis=(3, 5))


def attention_with_pooling_reference(q, k, v, shape: AttentionShape, lengths=None, return_lse=False):
    """Dense attention plus the block max-pooled probability map (see DESIGN.md, Contracts)."""
    out, probs, lse = _softmax_attention(q, k, v, visibility(shape, lengths), shape)
    pooled = block_max_pool(probs, shape.block_size).astype(jnp.promote_types(jnp.float32, probs.dtype))
    if return_lse:
        return out, pooled, lse.astype(pooled.dtype)
    return out, pooled


def block_sparse_attention_reference(q, k, v, block_mask, shape: AttentionShape, lengths=None):
    """Attention restricted to the selected blocks (and causality and padding); empty rows give zeros."""
    visible = visibility(shape, lengths) & expand_block_mask(block_mask, shape)
    out, _, _ = _softmax_attention(q, k, v, visible, shape)
    return out
