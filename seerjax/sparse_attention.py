"""Attention functions of SeerAttention, registered on the model's attention seam.

``"pooled"`` — gate distillation: dense attention through `attention_with_pooling`, which also yields the
layer's block max-pooled attention map (the target), plus the gate's logits on stop-gradient q and k.
``"seer"`` — inference: gate → block selection → `block_sparse_attention`. ``"oracle"`` (``"oracle_kv"``: one
mask per KV head, the bound for KV-head gates) and the
training-free baselines ``"streaming"``, ``"vertical_slash"``, ``"quest"``, ``"moba"`` select blocks from
other scores with the same TopK, so all compare at matched density. Selection settings come from the
attention config (`density` or `threshold`, `keep_first`, `dense_last_rows`, `budget`, `block_size`), not from code;
`decode_tokens` makes the last rows dense, as tokens decoded after a sparse prefill are.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from seerjax.attention import AttentionError, AttentionInputs, AttentionOutputs, reference_attention, register_attention
from seerjax.gate import group_max
from seerjax.kernels import attention_with_pooling, block_sparse_attention
from seerjax.rope import apply_rope, rope_frequencies
from seerjax.selection import (
    SelectionConfig,
    achieved_density,
    moba_scores,
    quest_scores,
    select_blocks,
    streaming_scores,
    vertical_slash_scores,
)


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
    out, pooled = _with_pooling(inputs, _block_size(inputs))
    aux = {"pooled": jax.lax.stop_gradient(pooled)}
    if inputs.gate is not None:
        aux["gate_logits"] = gate_logits(inputs)
    return AttentionOutputs(out, aux)


# -- sparse inference: a score source → block selection → block_sparse_attention ----------------------


def _key_blocks_valid(inputs: AttentionInputs, block_size: int):
    if inputs.lengths is None:
        return None
    nk = -(-inputs.k.shape[1] // block_size)
    return jnp.arange(nk)[None, :] * block_size < inputs.lengths.astype(jnp.int32)[:, None]


def _block_size(inputs: AttentionInputs) -> int:
    if inputs.gate is not None:
        return inputs.gate.config.block_size
    return int(inputs.config.get("block_size", 64))


def _with_pooling(inputs: AttentionInputs, block_size: int):
    """Dense attention of these inputs and its block max-pooled map (`attention_with_pooling`)."""
    return attention_with_pooling(
        inputs.q, inputs.k, inputs.v, causal=inputs.causal, block_size=block_size,
        sm_scale=inputs.config.get("sm_scale"), lengths=inputs.lengths, implementation=inputs.config.get("implementation"),
    )


def _sparse(inputs: AttentionInputs, scores, block_size: int, aux=None, premasked: bool = False) -> AttentionOutputs:
    cfg = SelectionConfig.from_options(inputs.config)
    valid = _key_blocks_valid(inputs, block_size)
    mask = select_blocks(
        scores, cfg, causal=inputs.causal, key_blocks_valid=valid, implementation=inputs.config.get("implementation"),
        premasked=premasked,
    )
    out = block_sparse_attention(
        inputs.q,
        inputs.k,
        inputs.v,
        mask,
        causal=inputs.causal,
        block_size=block_size,
        sm_scale=inputs.config.get("sm_scale"),
        lengths=inputs.lengths,
        implementation=inputs.config.get("implementation"),
    )
    aux = dict(aux or {})
    aux["density"] = achieved_density(mask, causal=inputs.causal, key_blocks_valid=valid)
    if inputs.config.get("return_mask"):
        aux["mask"] = mask
    return AttentionOutputs(out, aux)


def sparse_prefill_dense_decode(method):
    """Wraps a sparse method so that ``decode_tokens`` = n > 0 in the config runs it as a served request does.

    SeerAttention sparsifies the prefill; the tokens decoded after it read the whole KV cache densely. So the first
    T - n rows (the prompt) go through the method exactly as a prefill of T - n tokens would (its gate or scores
    see the prompt only), and the last n rows attend densely to every key, the prompt's K/V being those that
    sparse prefill wrote. Causality makes one pass equal to prefill-then-decode. For evaluation, where n is a
    handful of answer tokens (T == S, no padding).
    """

    @functools.wraps(method)
    def wrapped(inputs: AttentionInputs) -> AttentionOutputs:
        n = inputs.config.get("decode_tokens", 0) or 0
        t, s = inputs.q.shape[1], inputs.k.shape[1]
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < t:
            raise AttentionError(f"decode_tokens must be an int in [0, q_len={t}), got {n!r}")
        if n == 0:
            return method(inputs)
        if inputs.lengths is not None or t != s:
            raise AttentionError(
                f"decode_tokens (dense rows at the end of the sequence) needs lengths=None and q_len == kv_len, "
                f"got lengths={'set' if inputs.lengths is not None else None}, T={t}, S={s}"
            )
        p = t - n
        config = {key: val for key, val in inputs.config.items() if key != "decode_tokens"}
        prompt = dataclasses.replace(
            inputs, q=inputs.q[:, :p], k=inputs.k[:, :p], v=inputs.v[:, :p], q_nope=inputs.q_nope[:, :p],
            k_nope=inputs.k_nope[:, :p], positions=inputs.positions[:, :p], config=config,
        )
        head = method(prompt)
        tail = dataclasses.replace(
            inputs, q=inputs.q[:, p:], q_nope=inputs.q_nope[:, p:], positions=inputs.positions[:, p:], config=config
        )
        out = jnp.concatenate([head.out, reference_attention(tail).out.astype(head.out.dtype)], axis=1)
        return AttentionOutputs(out, head.aux)  # aux (density, mask, gate logits) of the prefill

    return wrapped


@register_attention("seer")
@sparse_prefill_dense_decode
def seer_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """SeerAttention: the layer's AttnGate scores blocks (softmax over key blocks), TopK or threshold picks."""
    if inputs.gate is None:
        raise AttentionError(
            f"attention 'seer' needs AttnGates, but layer {inputs.layer} has none; load them with "
            "seerjax.gates_io.load_gates(model, gates_dir)"
        )
    logits = gate_logits(inputs)
    # TopK needs only the order of the logits; a threshold needs the softmax scores.
    threshold = inputs.config.get("threshold") is not None
    scores = jax.nn.softmax(logits, axis=-1) if threshold else logits
    aux = {"gate_logits": logits} if inputs.config.get("return_gate") else None
    # The gate's logits are -1e30 outside the causal/padding visibility: TopK can use them as they are.
    return _sparse(inputs, scores, inputs.gate.config.block_size, aux, premasked=not threshold)


@register_attention("oracle")
@sparse_prefill_dense_decode
def oracle_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """The upper bound: blocks picked from the true block max-pooled attention map of this very input."""
    bs = _block_size(inputs)
    return _sparse(inputs, _with_pooling(inputs, bs)[1], bs)


@register_attention("oracle_kv")
@sparse_prefill_dense_decode
def oracle_kv_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """The upper bound for one mask per KV head: each group's block max-pooled maps, max-ed over its query heads
    (the KV-head gates' distillation target, `gate_targets`), pick the blocks the whole group reads."""
    bs = _block_size(inputs)
    return _sparse(inputs, group_max(_with_pooling(inputs, bs)[1], inputs.k.shape[2]), bs)


@register_attention("streaming")
@sparse_prefill_dense_decode
def streaming_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """StreamingLLM: the sink block and a local window of blocks, sized to the density."""
    bs = _block_size(inputs)
    b, t, hq, _ = inputs.q.shape
    nq, nk = -(-t // bs), -(-inputs.k.shape[1] // bs)
    return _sparse(inputs, streaming_scores(b, inputs.k.shape[2], nq, nk), bs)


@register_attention("vertical_slash")
@sparse_prefill_dense_decode
def vertical_slash_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """MInference-style vertical-slash pattern estimated from the last query block."""
    bs = _block_size(inputs)
    scores = vertical_slash_scores(inputs.q, inputs.k, bs, inputs.sm_scale, inputs.lengths)
    return _sparse(inputs, scores, bs)


@register_attention("quest")
@sparse_prefill_dense_decode
def quest_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """Quest-style: per-channel key min/max bound per block against the mean query of each block."""
    bs = _block_size(inputs)
    return _sparse(inputs, quest_scores(inputs.q, inputs.k, bs, inputs.lengths), bs)


@register_attention("moba")
@sparse_prefill_dense_decode
def moba_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """MoBA-style: mean-pooled queries against mean-pooled keys, TopK blocks."""
    bs = _block_size(inputs)
    return _sparse(inputs, moba_scores(inputs.q, inputs.k, bs, inputs.lengths), bs)


SPARSE_METHODS = ("seer", "oracle", "oracle_kv", "streaming", "vertical_slash", "quest", "moba")
