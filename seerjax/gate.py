"""AttnGate: the learned block-level attention predictor of SeerAttention.

The gate sees one layer's q and k *before* RoPE, pools them along the sequence in blocks (Q by
average, K by max, min and average concatenated on channels by default), projects them per head,
applies RoPE at the block-start positions and scores query blocks against key blocks. Its softmax
over key blocks is trained to match the layer's own block max-pooled attention map.

Sub-blocks (`q_sub_blocks`, `k_sub_blocks`, default 1): the gate may pool and score at a finer grain, e.g. four
16-token query sub-blocks per 64-token block, and give each block the best score of its (causally allowed)
sub-block pairs. The target is a max over the block's queries and keys, and a bilinear score of one pooled
query cannot express a max over the block's queries; a max over sub-block scores comes closer. The parameters
keep their shapes: only the scoring grain changes, so gates can be warm-started across sub-block settings.

Two head modes:
  * ``"query"`` — one gate per query head, the seed's released prefill gates. Without a Q linear
    (one Q pooling and d_gate == head_dim), K is repeated to the query heads before its linear
    (`mask_linear_k` `[Hq, n_k_pool·D, d_gate]`); with one, the projected K is repeated after it
    (`mask_linear_q` `[Hq, n_q_pool·D, d_gate]`, `mask_linear_k` `[Hkv, n_k_pool·D, d_gate]`).
  * ``"kv"`` — one gate per KV head (SeerAttention-R): the G query heads of a group, pooled, are
    combined by one linear map `[Hkv, G·n_q_pool·D, d_gate]`, so one block mask serves the whole
    group and the sparse kernel loads each K/V block once for it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

POOLINGS = ("max", "min", "avg")
HEAD_MODES = ("query", "kv")
NEG_INF = -1e30  # finite: masked gate logits must not turn the KL loss into NaN


class GateConfigError(ValueError):
    """Inconsistent gate settings, or gates that do not fit a model."""


class GateParam(nnx.Param):
    """Parameters of the AttnGates: the only variables gate distillation trains."""


def parse_gate_type(gate_type: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`"Qavg_Kmaxminavg"` → (("avg",), ("max", "min", "avg"))."""
    try:
        q_part, k_part = gate_type.split("_")
        assert q_part[0] == "Q" and k_part[0] == "K"
        return _split_poolings(q_part[1:]), _split_poolings(k_part[1:])
    except (ValueError, AssertionError, IndexError):
        raise GateConfigError(
            f"gate_type {gate_type!r} is not of the form Q<poolings>_K<poolings>, e.g. 'Qavg_Kmaxminavg'"
        ) from None


def parse_grain(text: str) -> tuple[int, int]:
    """`"8x8"` → (8, 8): query × key sub-blocks per block (`q_sub_blocks`, `k_sub_blocks`)."""
    parts = text.split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise GateConfigError(f"a grain is QxK positive sub-block counts, e.g. 8x8, got {text!r}")
    return int(parts[0]), int(parts[1])


def _split_poolings(s: str) -> tuple[str, ...]:
    out = []
    while s:
        for name in POOLINGS:
            if s.startswith(name):
                out.append(name)
                s = s[len(name) :]
                break
        else:
            raise ValueError(s)
    if not out:
        raise ValueError(s)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Everything needed to build, load and check a model's AttnGates (written as gate_config.json)."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 64
    d_gate: int = 128
    q_pooling: tuple[str, ...] = ("avg",)
    k_pooling: tuple[str, ...] = ("max", "min", "avg")
    heads: str = "query"
    force_double: bool = False
    qk_norm: bool = False
    q_sub_blocks: int = 1
    k_sub_blocks: int = 1

    def __post_init__(self):
        object.__setattr__(self, "q_pooling", tuple(self.q_pooling))
        object.__setattr__(self, "k_pooling", tuple(self.k_pooling))
        if self.block_size not in (16, 32, 64, 128):
            raise GateConfigError(f"block_size must be one of (16, 32, 64, 128), got {self.block_size!r}")
        if self.heads not in HEAD_MODES:
            raise GateConfigError(f"heads (gate head mode) must be one of {HEAD_MODES}, got {self.heads!r}")
        for name, pools in (("q_pooling", self.q_pooling), ("k_pooling", self.k_pooling)):
            if not pools or any(p not in POOLINGS for p in pools) or len(set(pools)) != len(pools):
                raise GateConfigError(f"{name} must be a non-empty list of distinct names from {POOLINGS}, got {list(pools)}")
        for name in ("q_sub_blocks", "k_sub_blocks"):
            m = getattr(self, name)
            if isinstance(m, bool) or not isinstance(m, int) or m < 1 or self.block_size % m:
                raise GateConfigError(
                    f"{name} must be a positive int dividing block_size ({self.block_size}), got {m!r}"
                )
        if self.d_gate < 2 or self.d_gate % 2:
            raise GateConfigError(f"d_gate must be an even positive number (RoPE pairs channels), got {self.d_gate}")
        for name in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise GateConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise GateConfigError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def same_but_grain(self, other: "GateConfig") -> bool:
        """Whether `other` differs from this config at most in the scoring grain (q_sub_blocks, k_sub_blocks):
        then the gates' tensors are interchangeable."""
        return dataclasses.replace(self, q_sub_blocks=other.q_sub_blocks, k_sub_blocks=other.k_sub_blocks) == other

    @property
    def gate_type(self) -> str:
        return f"Q{''.join(self.q_pooling)}_K{''.join(self.k_pooling)}"

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    @property
    def gate_heads(self) -> int:
        """Heads of the gate's output (and of the block mask): Hq or Hkv."""
        return self.num_q_heads if self.heads == "query" else self.num_kv_heads

    @property
    def has_q_linear(self) -> bool:
        if self.heads == "kv":
            return True
        return len(self.q_pooling) > 1 or self.d_gate != self.head_dim or self.force_double

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["q_pooling"], d["k_pooling"] = list(self.q_pooling), list(self.k_pooling)
        d["gate_type"] = self.gate_type
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GateConfig":
        d = dict(d)
        d.pop("gate_type", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise GateConfigError(f"gate config has unknown fields {unknown}; known fields are {sorted(fields)}")
        missing = sorted(f for f in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim") if f not in d)
        if missing:
            raise GateConfigError(f"gate config is missing fields {missing}")
        return cls(**d)

    @classmethod
    def from_json(cls, path: str) -> "GateConfig":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise GateConfigError(f"gate config {path!r} is not valid JSON: {e}") from e


def pool_blocks(x_bthd: jax.Array, block_size: int, kinds: tuple[str, ...], lengths=None) -> jax.Array:
    """Pools `[B, T, H, D]` over blocks of the sequence → `[B, n, H, len(kinds)·D]` (float32).

    The last partial block (and blocks cut by `lengths`) pool over their valid tokens only; blocks
    with no valid token give zeros. On GPU this is the one-pass Pallas kernel of
    :mod:`seerjax.kernels.block_pool` (differentiable: its backward is the XLA version's); elsewhere the XLA
    version, :func:`seerjax.kernels.block_pool.pool_blocks_xla`. Bad `block_size` or `kinds` raise
    :class:`~seerjax.kernels.block_pool.BlockPoolError` (a ValueError).
    """
    from seerjax.kernels.block_pool import pool_blocks_kernel

    return pool_blocks_kernel(x_bthd, block_size, kinds, lengths)


def block_causal_mask(nq: int, nk: int, causal: bool = True, key_blocks_valid=None) -> jax.Array:
    """Bool `[B or 1, 1, nq, nk]`: key block j is allowed for query block i (diagonal included).

    Bottom-right aligned like the kernels: query block i covers key block i + (nk - nq).
    """
    i = jnp.arange(nq)[:, None]
    j = jnp.arange(nk)[None, :]
    allowed = (j <= i + (nk - nq)) if causal else jnp.ones((nq, nk), bool)
    allowed = allowed[None, None]
    if key_blocks_valid is not None:
        allowed = allowed & key_blocks_valid[:, None, None, :]
    return allowed


def _rms_norm(x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class AttnGate(nnx.Module):
    """One layer's gate. Call with q `[B,T,Hq,D]` and k `[B,S,Hkv,D]` before RoPE → logits `[B,Hg,nq,nk]`."""

    def __init__(self, config: GateConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        c = config
        nqp, nkp = len(c.q_pooling), len(c.k_pooling)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2)
        if c.heads == "kv":
            q_shape, k_heads = (c.num_kv_heads, c.group * nqp * c.head_dim, c.d_gate), c.num_kv_heads
        else:
            q_shape = (c.num_q_heads, nqp * c.head_dim, c.d_gate)
            k_heads = c.num_kv_heads if c.has_q_linear else c.num_q_heads
        # Logical axes: gate heads follow the model's head sharding; in/out channels stay whole.
        q_axes = ("kv_heads" if c.heads == "kv" else "q_heads", None, None)
        self.mask_linear_q = (
            GateParam(init(rngs.params(), q_shape, param_dtype), out_sharding=q_axes, eager_sharding=False) if c.has_q_linear else None
        )
        k_axes = ("kv_heads" if k_heads == c.num_kv_heads else "q_heads", None, None)
        self.mask_linear_k = GateParam(init(rngs.params(), (k_heads, nkp * c.head_dim, c.d_gate), param_dtype), out_sharding=k_axes, eager_sharding=False)

    def __call__(
        self,
        q_bthd: jax.Array,
        k_bshd: jax.Array,
        *,
        rope: Callable[[jax.Array, jax.Array], jax.Array] | None,
        positions_bt: jax.Array | None = None,
        lengths: jax.Array | None = None,
        causal: bool = True,
        score_dtype=None,
    ) -> jax.Array:
        """Masked gate logits (float32; masked entries are a large negative number).

        Args:
          q_bthd, k_bshd: q and k before RoPE.
          rope: `rope(x_bnhd, positions_bn)` rotating d_gate channels with the model's theta and
            scaling; None skips RoPE.
          positions_bt: positions of the query tokens (default `arange(T)`; keys use `arange(S)`).
          lengths: optional `[B]` right padding (T == S).
          score_dtype: operand dtype of the block-score matmul (float32 accumulation either way); None
            takes q's dtype, so bf16 activations score in bf16 on the tensor cores (at 128k tokens this
            matmul is 34 GFLOP per layer) and float32 activations keep full float32 precision.
        """
        c = self.config
        b, t, hq, d = q_bthd.shape
        s = k_bshd.shape[1]
        bs = c.block_size
        nq, nk = -(-t // bs), -(-s // bs)
        mq, mk = c.q_sub_blocks, c.k_sub_blocks
        sq, sk = bs // mq, bs // mk  # sub-block sizes: the gate scores sub-blocks, then takes each block's max
        qp = _pool_padded(q_bthd, sq, c.q_pooling, lengths, nq * mq)  # [B, nq·mq, Hq, nqp·D]
        kp = _pool_padded(k_bshd, sk, c.k_pooling, lengths, nk * mk)  # [B, nk·mk, Hkv, nkp·D]
        hp = jax.lax.Precision.HIGHEST
        if c.heads == "kv":
            qp = qp.reshape(b, nq * mq, c.num_kv_heads, c.group * qp.shape[-1])
        if self.mask_linear_q is not None:
            qg = jnp.einsum("bnhi,hio->bnho", qp, self.mask_linear_q[...].astype(jnp.float32), precision=hp)
            kg = jnp.einsum("bnhi,hio->bnho", kp, self.mask_linear_k[...].astype(jnp.float32), precision=hp)
        else:
            qg = qp
            kg = jnp.einsum(
                "bnhi,hio->bnho", jnp.repeat(kp, c.group, axis=2), self.mask_linear_k[...].astype(jnp.float32), precision=hp
            )
        if c.qk_norm:
            qg, kg = _rms_norm(qg), _rms_norm(kg)
        if rope is not None:
            if positions_bt is None:
                positions_bt = jnp.broadcast_to(jnp.arange(t) + (s - t), (b, t))
            q_pos = _sub_block_starts(positions_bt, sq, nq * mq)
            k_pos = jnp.broadcast_to(jnp.arange(nk * mk) * sk, (b, nk * mk))
            qg, kg = rope(qg, q_pos), rope(kg, k_pos)
        sdt = jnp.dtype(q_bthd.dtype if score_dtype is None else score_dtype)
        scale = 1.0 / math.sqrt(c.d_gate)
        qg, kg = (qg * scale).astype(sdt), kg.astype(sdt)
        if mq > 1 or mk > 1:  # K heads stay unrepeated: the scorer maps each query head to its K head
            from seerjax.kernels.sub_block_scores import sub_block_scores

            logits = sub_block_scores(qg, kg, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, lengths=lengths, causal=causal)
        else:
            if kg.shape[2] != qg.shape[2]:
                kg = jnp.repeat(kg, qg.shape[2] // kg.shape[2], axis=2)
            logits = jnp.einsum(
                "bihd,bjhd->bhij", qg, kg, precision=hp if sdt == jnp.float32 else None, preferred_element_type=jnp.float32
            )
        valid_k = None
        if lengths is not None:
            valid_k = jnp.arange(nk)[None, :] * bs < lengths.astype(jnp.int32)[:, None]
        allowed = block_causal_mask(nq, nk, causal, valid_k)
        return jnp.where(allowed, logits, NEG_INF)


def _pool_padded(x_bthd, size: int, kinds, lengths, n: int) -> jax.Array:
    """`pool_blocks` at `size`, padded with zero rows to `n` pooled rows (sub-blocks past a short last block)."""
    pooled = pool_blocks(x_bthd, size, kinds, lengths)
    if pooled.shape[1] < n:
        pooled = jnp.pad(pooled, ((0, 0), (0, n - pooled.shape[1]), (0, 0), (0, 0)))
    return pooled


def _sub_block_starts(positions_bt: jax.Array, size: int, n: int) -> jax.Array:
    """Position of each sub-block's first token `[B, n]` (past the end: continuing by `size`)."""
    starts = positions_bt[:, ::size]
    if starts.shape[1] < n:
        extra = starts[:, -1:] + size * jnp.arange(1, n - starts.shape[1] + 1)[None, :]
        starts = jnp.concatenate([starts, extra.astype(starts.dtype)], axis=1)
    return starts


def group_max(pooled_bhij: jax.Array, num_kv_heads: int) -> jax.Array:
    """`[B, Hq, nq, nk]` → `[B, Hkv, nq, nk]`: each KV head's map is the max over its group's query heads."""
    b, h, nq, nk = pooled_bhij.shape
    return pooled_bhij.reshape(b, num_kv_heads, h // num_kv_heads, nq, nk).max(axis=2)


def gate_targets(pooled_bhij: jax.Array, config: GateConfig) -> jax.Array:
    """Ground truth from the kernel's pooled map `[B, Hq, nq, nk]`: per-KV-head gates take the max
    over the group's query heads first (`group_max`); each row is then normalized to sum 1 (empty rows stay 0)."""
    p = pooled_bhij.astype(jnp.float32)
    if config.heads == "kv":
        p = group_max(p, config.num_kv_heads)
    total = jnp.sum(p, axis=-1, keepdims=True)
    return jnp.where(total > 0, p / jnp.where(total > 0, total, 1.0), 0.0)


def gate_kl_loss(logits_bhij: jax.Array, target_bhij: jax.Array, *, skip_fraction: float = 0.25) -> jax.Array:
    """KL(target ‖ softmax(logits)), element-wise mean over the kept query blocks (the seed's loss).

    The first `skip_fraction` of query blocks is dropped: their rows have few key blocks and
    carry little signal.
    """
    nq = logits_bhij.shape[2]
    start = min(int(nq * skip_fraction), nq - 1)
    logp = jax.nn.log_softmax(logits_bhij[:, :, start:].astype(jnp.float32), axis=-1)
    tgt = target_bhij[:, :, start:].astype(jnp.float32)
    kl = jnp.where(tgt > 0, tgt * (jnp.log(jnp.where(tgt > 0, tgt, 1.0)) - logp), 0.0)
    return jnp.mean(kl)
