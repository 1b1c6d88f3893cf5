"""Attention functions of SeerAttention, registered on the model's attention seam.

``"pooled"`` — gate distillation: dense attention through `attention_with_pooling`, which also yields the
layer's block max-pooled attention map (the target), plus the gate's logits on stop-gradient q and k.
"""

from __future__ import annotations

import jax

from seerjax.attention import AttentionInputs, AttentionOutputs, register_attention
from seerjax.kernels import attention_with_pooling
from seerjax.rope import apply_rope, rope_frequencies


def gate_rope(inputs: AttentionInputs, d_gate: int):
    """The gate's own rotary embedding: head size d_gate, the model's theta and scaling."""
    inv_freq, scaling = rope_frequencies(inputs.model_config.rope, d_gate)
    return lambda x, positions: apply_rope(x, positions, inv_freq, scaling)


def gate_logits(inputs: AttentionInputs) -> jax.Array:
    """The layer gate's masked logits `[B, Hg, nq, nk]`; the gate sees stop-gradient q and k (before RoPE)."""
    gate = inputs.gate
    return gate(
        jax.lax.stop_gradient(inputs.q_nope),
        jax.lax.stop_gradient(inputs.k_nope),
        rope=gate_rope(inputs, gate.config.d_gate),
        positions_bt=inputs.positions,
        lengths=inputs.lengths,
        causal=inputs.causal,
    )


@register_attention("pooled")
def pooled_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """Dense attention plus aux ``pooled`` (float32 `[B, Hq, nq, nk]`) and, with a gate, ``gate_logits``."""
    cfg = inputs.config
    block_size = inputs.gate.config.block_size if inputs.gate is not None else cfg.get("block_size", 64)
    out, pooled = attention_with_pooling(
        inputs.q,
        inputs.k,
        inputs.v,
        causal=inputs.causal,
        block_size=block_size,
        sm_scale=cfg.get("sm_scale"),
        lengths=inputs.lengths,
        implementation=cfg.get("implementation"),
    )
    aux = {"pooled": jax.lax.stop_gradient(pooled)}
    if inputs.gate is not None:
        aux["gate_logits"] = gate_logits(inputs)
    return AttentionOutputs(out, aux)
