"""Rotary position embeddings: default, linear, llama3 and YaRN frequencies, split-halves rotation.

The rotation pairs channel i with channel i + D/2 (HF's ``rotate_half``), so HF q/k projection weights load
without the interleave permutation Meta's original checkpoints need.

:func:`rope_frequencies` depends only on the rope fields and a head size, so the SeerAttention gate reuses it
for its own rotary embedding of head size d_gate (model theta and scaling, positions 0, 64, 128, ...).
The formulas follow transformers 5 ``modeling_rope_utils`` exactly, including its defaults.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from seerjax.config import RopeConfig
from seerjax.errors import ConfigError


@functools.lru_cache(maxsize=64)
def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention scaling of one rotary embedding.

    Args:
      rope: the model's rope fields (type, theta and scaling parameters).
      head_dim: rotated size D (even); the model's head_dim, or the gate's d_gate.

    Returns:
      ``(inv_freq, attention_scaling)``: inv_freq float32 ``[D // 2]`` (angle of channel pair i at position p
      is ``p * inv_freq[i]``), and the factor that multiplies cos and sin (1.0 except for YaRN).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ConfigError(f"head_dim must be a positive even integer for RoPE, got {head_dim!r}")
    dim = head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    scaling = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        inv_freq = _llama3(inv_freq, rope)
    elif rope.rope_type == "yarn":
        inv_freq, scaling = _yarn(inv_freq, rope, dim)
    inv_freq = inv_freq.astype(np.float32)
    inv_freq.flags.writeable = False  # cached: shared by every caller
    return inv_freq, float(scaling)


def _llama3(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Long wavelengths divided by factor, short ones kept, a smooth blend between the two band edges."""
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv_freq: np.ndarray, rope: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, ramp between."""
    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1
    base, context = rope.theta, rope.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoids a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, attention_factor


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq, scaling: float = 1.0) -> jax.Array:
    """Rotates channel pairs (i, i + D/2) of x by ``position * inv_freq[i]``, computed in float32.

    Args:
      x_btnh: ``[B, T, N, D]`` queries or keys.
      positions_bt: ``[B, T]`` (or broadcastable) integer positions.
      inv_freq: ``[D // 2]`` from :func:`rope_frequencies`.
      scaling: multiplies cos and sin (YaRN's attention factor).

    Returns:
      ``[B, T, N, D]`` in x's dtype.
    """
    inv_freq = jnp.asarray(inv_freq, jnp.float32)
    angles_bti = positions_bt.astype(jnp.float32)[..., None] * inv_freq
    cos = (jnp.cos(angles_bti) * scaling)[:, :, None, :]
    sin = (jnp.sin(angles_bti) * scaling)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)
