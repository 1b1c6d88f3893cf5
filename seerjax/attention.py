"""The attention seam: a registry of attention functions the model calls once per layer.

Each function takes an :class:`AttentionInputs` and returns an :class:`AttentionOutputs`. The model picks one
by name (``model.attention``, or ``attention=`` per call, a name or one name per layer), so dense, pooled
(distillation) and block-sparse attention plug in without touching the model::

    @register_attention("my_attention")
    def my_attention(inputs: AttentionInputs) -> AttentionOutputs:
        ...

Registered here: ``"reference"`` (jnp, float32 softmax, any platform) and ``"cudnn"``
(``jax.nn.dot_product_attention(implementation="cudnn")``, CUDA GPUs only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from seerjax.errors import SeerjaxError


class AttentionError(SeerjaxError):
    """An attention function cannot run with the given inputs, options or platform."""


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What one layer hands to its attention function.

    q: ``[B, T, Hq, D]`` after RoPE; k, v: ``[B, S, Hkv, D]`` (k after RoPE), ``Hq % Hkv == 0``.
    q_nope, k_nope: q and k before RoPE (after the qwen3 q/k norm), what the AttnGate pools.
    positions: int ``[B, T]`` positions of the queries (the RoPE positions).
    lengths: optional int ``[B]``; positions >= lengths[b] are right padding (T == S).
    layer: index of the layer.
    causal: bottom-right aligned causal mask (query t sees key s iff s <= t + S - T).
    gate: the layer's gate module (an AttnGate), or None.
    config: per-call attention options (e.g. ``block_size``, ``sm_scale``, a sparsity target); read-only.
    model_config: the :class:`~seerjax.config.ModelConfig` (rope fields for the gate's own RoPE).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    q_nope: jax.Array
    k_nope: jax.Array
    positions: jax.Array
    lengths: jax.Array | None
    layer: int
    causal: bool = True
    gate: Any = None
    config: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_config: Any = None

    @property
    def sm_scale(self) -> float:
        """``config["sm_scale"]`` or ``1 / sqrt(D)``."""
        scale = self.config.get("sm_scale")
        return 1.0 / math.sqrt(self.q.shape[-1]) if scale is None else float(scale)


@dataclasses.dataclass(frozen=True)
class AttentionOutputs:
    """out: ``[B, T, Hq, D]`` in q's dtype; aux: per-layer extras the model collects (pooled maps, gate scores)."""

    out: jax.Array
    aux: dict = dataclasses.field(default_factory=dict)


AttentionFn = Callable[[AttentionInputs], AttentionOutputs]
ATTENTION_FNS: dict[str, AttentionFn] = {}


def register_attention(name: str, fn: AttentionFn | None = None, *, overwrite: bool = False):
    """Registers ``fn`` under ``name``; usable as ``register_attention(name, fn)`` or as a decorator.

    Registering a different function under a taken name needs ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise AttentionError(f"attention name must be a non-empty string, got {name!r}")

    def register(f: AttentionFn) -> AttentionFn:
        if not callable(f):
            raise AttentionError(f"attention function for {name!r} must be callable, got {type(f).__name__}")
        if ATTENTION_FNS.get(name, f) is not f and not overwrite:
            raise AttentionError(f"attention {name!r} is already registered; pass overwrite=True to replace it")
        ATTENTION_FNS[name] = f
        return f

    return register if fn is None else register(fn)


def get_attention(name: str) -> AttentionFn:
    """The registered function called ``name``; an unknown name raises an AttentionError listing the known ones."""
    if not isinstance(name, str) or name not in ATTENTION_FNS:
        raise AttentionError(f"attention must be one of the registered names {sorted(ATTENTION_FNS)}, got {name!r}")
    return ATTENTION_FNS[name]


def _check(inputs: AttentionInputs) -> tuple[int, int, int, int, int]:
    b, t, hq, d = inputs.q.shape
    s, hkv = inputs.k.shape[1], inputs.k.shape[2]
    if hq % hkv:
        raise AttentionError(f"query heads ({hq}, q {inputs.q.shape}) must be a multiple of key heads ({hkv}, k {inputs.k.shape})")
    if inputs.causal and t > s:
        raise AttentionError(f"causal attention needs q_len <= kv_len, got T={t} (q) > S={s} (k)")
    if inputs.lengths is not None and t != s:
        raise AttentionError(f"lengths (right padding) needs q_len == kv_len, got T={t} (q) and S={s} (k)")
    return b, t, s, hq, hkv


def visible_mask(q_len: int, kv_len: int, causal: bool, lengths: jax.Array | None) -> jax.Array:
    """Bool ``[B or 1, 1, 1, T, S]``: query t may see key s (bottom-right causal, right padding)."""
    t_idx = jnp.arange(q_len)[:, None]
    s_idx = jnp.arange(kv_len)[None, :]
    vis = s_idx <= t_idx + (kv_len - q_len) if causal else jnp.ones((q_len, kv_len), bool)
    vis = vis[None, None, None]
    if lengths is not None:
        n = lengths.astype(jnp.int32)[:, None, None, None, None]
        vis = vis & (s_idx < n) & (t_idx < n)
    return vis


def reference_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """Dense softmax attention in jnp: float32 logits and softmax; rows with no visible key are zero.

    Materializes ``[B, Hq, T, S]`` scores: for tests, short sequences and CPU.
    """
    b, t, s, hq, hkv = _check(inputs)
    q, k, v = inputs.q, inputs.k, inputs.v
    d = q.shape[-1]
    q_btkgd = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * inputs.sm_scale
    visible = visible_mask(t, s, inputs.causal, inputs.lengths)
    # A finite fill and jax.nn.softmax (its own backward rule): exp underflows to exactly 0 off the mask, and a
    # row with no visible key (right padding) is zeroed by its flag. Half the CPU time of a hand-written masked
    # softmax, whose backward differentiated max, exp, sum and the division one by one.
    probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
    if inputs.lengths is not None:
        probs = probs * jnp.any(visible, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return AttentionOutputs(out.reshape(b, t, hq, d).astype(q.dtype))


def cudnn_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """cuDNN flash attention through ``jax.nn.dot_product_attention``; bfloat16/float16 on CUDA GPUs."""
    b, t, s, hq, hkv = _check(inputs)
    if jax.default_backend() not in ("gpu", "cuda"):
        raise AttentionError(
            f"attention 'cudnn' needs a CUDA GPU, but the default backend is {jax.default_backend()!r}; "
            "use attention='reference' on this platform"
        )
    if jnp.dtype(inputs.q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise AttentionError(
            f"attention 'cudnn' needs bfloat16 or float16 q, k, v, got {jnp.dtype(inputs.q.dtype).name}; "
            "load the model with dtype='bfloat16' or use attention='reference'"
        )
    if inputs.causal and t != s:
        raise AttentionError(
            f"attention 'cudnn' aligns its causal mask top-left, so it needs q_len == kv_len, got T={t}, S={s}"
        )
    out = jax.nn.dot_product_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        scale=inputs.sm_scale,
        is_causal=inputs.causal,
        query_seq_lengths=None if inputs.lengths is None else inputs.lengths.astype(jnp.int32),
        key_value_seq_lengths=None if inputs.lengths is None else inputs.lengths.astype(jnp.int32),
        implementation="cudnn",
    )
    if inputs.lengths is not None:
        valid_bt = jnp.arange(t)[None, :] < inputs.lengths[:, None]
        out = jnp.where(valid_bt[:, :, None, None], out, 0)
    return AttentionOutputs(out)


register_attention("reference", reference_attention)
register_attention("cudnn", cudnn_attention)
