"""Flax NNX decoder for the Llama, Qwen2 and Qwen3 families (one class, :class:`LlamaModel`).

Layers are a Python list (``nnx.List``), not a scanned stack, because

- each layer may run a different attention function (``attention=`` takes one name per layer) and holds its
  own AttnGate, whose aux outputs (pooled maps, gate scores) the model collects per layer;
- HF tensors map one to one onto per-layer parameters, so loading fills each parameter in place without
  stacking the layers (no second copy of a stacked tensor while loading);
- the cost, a compile time that grows with depth, stays acceptable (tens of seconds for 32 layers).

Every parameter carries logical axis names in its ``out_sharding`` metadata (with ``eager_sharding=False``,
so creating a model needs no mesh): ``vocab``, ``embed``, ``q_heads``, ``kv_heads``, ``head_dim`` and
``mlp``. A sharding rules table maps them to mesh axes later (``nnx.get_partition_spec``), without touching
this file. Weights use the layout of the einsums that consume them (``[embed, heads, head_dim]`` for q, k, v;
``[heads, head_dim, embed]`` for the output projection); ``seerjax.hf`` converts from HF's ``[out, in]``.

``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; norms, RoPE, softmax and logits are
computed in float32.
"""

from __future__ import annotations

import functools

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seerjax.attention import AttentionInputs, get_attention
from seerjax.config import ModelConfig
from seerjax.dtypes import resolve_dtype
from seerjax.errors import SeerjaxError
from seerjax.rope import apply_rope, rope_frequencies

INIT_STDDEV = 0.02  # transformers' initializer_range default


def _param(rngs: nnx.Rngs | None, init: str, shape: tuple[int, ...], dtype, axes: tuple[str, ...]) -> nnx.Param:
    """A parameter with its logical axes. ``init`` is "normal" (std 0.02), "ones" or "zeros"."""
    if init == "normal":
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * INIT_STDDEV).astype(dtype)
    else:
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """``weight * x / rms(x)`` over the last axis; the normalization runs in float32 (as HF)."""

    def __init__(self, dim: int, eps: float, axis: str, *, dtype, param_dtype):
        self.weight = _param(None, "ones", (dim,), param_dtype, (axis,))
        self.eps = float(eps)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * y.astype(self.dtype)


class Attention(nnx.Module):
    """GQA self-attention: projections, optional qwen3 q/k norm, RoPE, a registered attention function."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, hq, hkv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.layer = layer
        self.dtype = dtype
        self.q_proj = _param(rngs, "normal", (e, hq, d), param_dtype, ("embed", "q_heads", "head_dim"))
        self.k_proj = _param(rngs, "normal", (e, hkv, d), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = _param(rngs, "normal", (e, hkv, d), param_dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = _param(rngs, "normal", (hq, d, e), param_dtype, ("q_heads", "head_dim", "embed"))
        qkv_bias, out_bias, qk_norm = config.attention_bias, config.attention_out_bias, config.qk_norm
        self.q_bias = _param(None, "zeros", (hq, d), param_dtype, ("q_heads", "head_dim")) if qkv_bias else None
        self.k_bias = _param(None, "zeros", (hkv, d), param_dtype, ("kv_heads", "head_dim")) if qkv_bias else None
        self.v_bias = _param(None, "zeros", (hkv, d), param_dtype, ("kv_heads", "head_dim")) if qkv_bias else None
        self.o_bias = _param(None, "zeros", (e,), param_dtype, ("embed",)) if out_bias else None
        norm = dict(dim=d, eps=config.rms_norm_eps, axis="head_dim", dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(**norm) if qk_norm else None
        self.k_norm = RMSNorm(**norm) if qk_norm else None
        # The SeerAttention AttnGate of this layer (set by the gate code); None means no gate.
        self.gate = nnx.data(None)

    def _project(self, x_btd, w, b):
        y_btnh = jnp.einsum("btd,dnh->btnh", x_btd, w[...].astype(self.dtype))
        return y_btnh if b is None else y_btnh + b[...].astype(self.dtype)

    def __call__(self, x_btd, positions_bt, lengths, attention_fn, attention_config, rope, config) -> tuple:
        """``[B, T, E]`` → ``([B, T, E], aux dict)``; ``rope`` is ``(inv_freq, scaling)``."""
        q_btnh = self._project(x_btd, self.q_proj, self.q_bias)
        k_btnh = self._project(x_btd, self.k_proj, self.k_bias)
        v_btnh = self._project(x_btd, self.v_proj, self.v_bias)
        if self.q_norm is not None:
            q_btnh, k_btnh = self.q_norm(q_btnh), self.k_norm(k_btnh)
        inv_freq, scaling = rope
        inputs = AttentionInputs(
            q=apply_rope(q_btnh, positions_bt, inv_freq, scaling),
            k=apply_rope(k_btnh, positions_bt, inv_freq, scaling),
            v=v_btnh,
            q_nope=q_btnh,
            k_nope=k_btnh,
            positions=positions_bt,
            lengths=lengths,
            layer=self.layer,
            causal=True,
            gate=self.gate,
            config=attention_config,
            model_config=config,
        )
        with jax.named_scope("attention_fn"):
            result = attention_fn(inputs)
        out_btd = jnp.einsum("btnh,nhd->btd", result.out.astype(self.dtype), self.o_proj[...].astype(self.dtype))
        if self.o_bias is not None:
            out_btd = out_btd + self.o_bias[...].astype(self.dtype)
        return out_btd, result.aux


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, f = config.hidden_size, config.intermediate_size
        self.dtype = dtype
        self.gate_proj = _param(rngs, "normal", (e, f), param_dtype, ("embed", "mlp"))
        self.up_proj = _param(rngs, "normal", (e, f), param_dtype, ("embed", "mlp"))
        self.down_proj = _param(rngs, "normal", (f, e), param_dtype, ("mlp", "embed"))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        gate_btf = jnp.einsum("btd,df->btf", x_btd, self.gate_proj[...].astype(self.dtype))
        up_btf = jnp.einsum("btd,df->btf", x_btd, self.up_proj[...].astype(self.dtype))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, self.down_proj[...].astype(self.dtype))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``h + mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, layer: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(dim=config.hidden_size, eps=config.rms_norm_eps, axis="embed", dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(**norm)
        self.attn = Attention(config, layer, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_norm = RMSNorm(**norm)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd, positions_bt, lengths, attention_fn, attention_config, rope, config):
        with jax.named_scope("attention"):
            attn_btd, aux = self.attn(
                self.attn_norm(x_btd), positions_bt, lengths, attention_fn, attention_config, rope, config
            )
        h_btd = x_btd + attn_btd
        with jax.named_scope("mlp"):
            return h_btd + self.mlp(self.mlp_norm(h_btd)), aux


def lm_logits(hidden_btd: jax.Array, w_ve: jax.Array, dtype) -> jax.Array:
    """``[B, T, E]`` hidden states and the ``[V, E]`` LM head → float32 ``[B, T, V]`` logits, computed in ``dtype``."""
    return jnp.einsum("btd,vd->btv", hidden_btd.astype(dtype), w_ve.astype(dtype), preferred_element_type=jnp.float32)


class LlamaModel(nnx.Module):
    """Decoder-only transformer of the Llama / Qwen2 / Qwen3 families.

    ``model(input_ids)`` returns float32 logits ``[B, T, V]``. ``model.attention`` names the attention
    function (see :mod:`seerjax.attention`); ``forward`` can override it per call and also returns each
    layer's aux dict.

    Args:
      config: the model configuration.
      dtype: compute dtype (a jnp dtype or its name).
      param_dtype: storage dtype of the parameters; defaults to ``dtype``.
      rngs: random streams for the initial weights (normal, std 0.02; norms one, biases zero).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs):
        if not isinstance(config, ModelConfig):
            raise SeerjaxError(f"config must be a seerjax ModelConfig, got {type(config).__name__}")
        dtype = resolve_dtype(dtype, "dtype")
        param_dtype = dtype if param_dtype is None else resolve_dtype(param_dtype, "param_dtype")
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attention = config.attention
        self.embed = _param(rngs, "normal", (config.vocab_size, config.hidden_size), param_dtype, ("vocab", "embed"))
        self.layers = nnx.List(
            [DecoderLayer(config, i, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for i in range(config.num_layers)]
        )
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _param(rngs, "normal", (config.vocab_size, config.hidden_size), param_dtype, ("vocab", "embed"))
        )

    # -- forward -------------------------------------------------------------------------------------

    def __call__(self, input_ids, *, lengths=None, positions=None, attention=None, last_only: bool = False):
        """Float32 logits ``[B, T, V]`` (``[B, V]`` with ``last_only``); see :meth:`forward`."""
        return self.forward(
            input_ids, lengths=lengths, positions=positions, attention=attention, return_aux=False, last_only=last_only
        )

    def forward(
        self,
        input_ids,
        *,
        lengths=None,
        positions=None,
        attention: str | Sequence[str] | None = None,
        attention_config: Mapping[str, Any] | None = None,
        return_aux: bool = True,
        last_only: bool = False,
    ):
        """Logits, and each layer's attention aux dict.

        Args:
          input_ids: int ``[B, T]``.
          lengths: optional int ``[B]``; tokens at positions >= lengths[b] are right padding.
          positions: optional int ``[B, T]`` (or ``[T]``) RoPE positions; default ``0 .. T-1``.
          attention: a registered attention name, or one per layer; default ``self.attention``.
          attention_config: options handed to the attention functions (``AttentionInputs.config``).
          return_aux: also return the list of per-layer aux dicts.
          last_only: logits of the last token only, ``[B, V]`` (the token at ``lengths - 1`` with padding):
            skips the ``[B, T, V]`` logits, which dominate memory at long context.

        Returns:
          ``(logits, aux_per_layer)``, or ``logits`` when ``return_aux`` is false; logits float32.
        """
        hidden_btd, aux = self.hidden_states(
            input_ids, lengths=lengths, positions=positions, attention=attention, attention_config=attention_config
        )
        if last_only:
            b, t = hidden_btd.shape[:2]
            if lengths is None:
                last_b = jnp.full((b,), t - 1, jnp.int32)
            else:
                last_b = jnp.maximum(jnp.asarray(lengths).astype(jnp.int32) - 1, 0)
            hidden_btd = hidden_btd[jnp.arange(b), last_b][:, None]
        logits = self.logits(hidden_btd)
        if last_only:
            logits = logits[:, 0]
        return (logits, aux) if return_aux else logits

    def hidden_states(self, input_ids, *, lengths=None, positions=None, attention=None, attention_config=None):
        """Final-norm hidden states ``[B, T, E]`` (compute dtype) and the per-layer aux dicts."""
        input_ids, lengths, positions_bt = self._check_inputs(input_ids, lengths, positions)
        fns = self._attention_fns(attention)
        rope = rope_frequencies(self.config.rope, self.config.head_dim)
        attention_config = dict(attention_config or {})
        x_btd = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        aux_per_layer = []
        for layer, fn in zip(self.layers, fns):
            with jax.named_scope(f"layer_{layer.attn.layer}"):
                x_btd, aux = layer(x_btd, positions_bt, lengths, fn, attention_config, rope, self.config)
            aux_per_layer.append(aux)
        return self.final_norm(x_btd), aux_per_layer

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """``[B, T, E]`` → float32 ``[B, T, V]`` through the LM head (the embedding when tied)."""
        return lm_logits(hidden_btd, (self.embed if self.lm_head is None else self.lm_head)[...], self.dtype)

    # -- helpers -------------------------------------------------------------------------------------

    def _attention_fns(self, attention) -> list:
        names = self.attention if attention is None else attention
        n = self.config.num_layers
        if isinstance(names, str):
            names = [names] * n
        elif not isinstance(names, (list, tuple)) or len(names) != n:
            raise SeerjaxError(f"attention must be a registered name or a list of {n} names (one per layer), got {names!r}")
        return [get_attention(name) for name in names]

    def _check_inputs(self, input_ids, lengths, positions):
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise SeerjaxError(
                f"input_ids must be an integer array [batch, seq], got shape {input_ids.shape} dtype {input_ids.dtype}"
            )
        b, t = input_ids.shape
        if lengths is not None:
            lengths = jnp.asarray(lengths)
            if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
                raise SeerjaxError(
                    f"lengths must be an integer array of shape [batch]=({b},), "
                    f"got shape {lengths.shape} dtype {lengths.dtype}"
                )
        if positions is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        else:
            positions = jnp.asarray(positions)
            if positions.shape not in ((b, t), (t,)) or not jnp.issubdtype(positions.dtype, jnp.integer):
                raise SeerjaxError(
                    f"positions must be an integer array of shape [batch, seq]=({b}, {t}) or [seq]=({t},), "
                    f"got shape {positions.shape} dtype {positions.dtype}"
                )
            positions_bt = jnp.broadcast_to(positions, (b, t))
        return input_ids, lengths, positions_bt


def random_model(config: ModelConfig, *, dtype=jnp.bfloat16, param_dtype=None, seed: int = 0) -> LlamaModel:
    """A randomly initialized model, each weight made directly on the default device in its own dtype.

    For benchmarks at real sizes (8B parameters): the module is built abstractly, then every parameter is
    drawn by a small jitted function cached per (shape, dtype), so XLA compiles a handful of tiny programs
    instead of one program holding every initializer (which compiles very slowly at 8B), and no float32
    host copy ever exists. Norm weights are one, biases zero, other weights normal with std 0.02.
    """

    def build():
        return LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    flat = nnx.to_flat_state(abstract)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    values = []
    for key, (path, var) in zip(keys, flat):
        name = "/".join(str(p) for p in path)
        kind = "ones" if "norm" in name else "zeros" if "bias" in name else "normal"
        values.append((path, var.replace(_init_leaf(key, var.shape, jnp.dtype(var.dtype), kind))))
    return nnx.merge(graphdef, nnx.from_flat_state(values))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_leaf(key, shape, dtype, kind):
    if kind == "normal":
        return (jax.random.normal(key, shape, jnp.float32) * INIT_STDDEV).astype(dtype)
    return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)
