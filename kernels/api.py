"""Public attention entry points and the implementation registry.

Each implementation name maps to a function of the validated inputs. ``implementation=None`` picks
the fastest one for the platform: the compiled Pallas kernels (Triton lowering) on GPU, Pallas interpret
mode on CPU; on sm_90+ GPUs, ``"hopper"``. ``"hopper"`` runs the
Mosaic GPU forward on sm_90+ where it was measured faster (per-KV-head masks: 1.4× the Triton kernel's speed
at 32k and 128k tokens, docs/benchmarks.md) and the Triton kernel otherwise, and the Mosaic GPU backward at
block 64 (1.7–2× the Triton backward's speed at 32k, density 0.1); for attention_with_pooling, the
Mosaic GPU pooled forward where :func:`seerjax.kernels.hopper.tuned_pooled_launch` gives a launch (block 64, 8k
tokens or more), else the Triton kernel.
``"reference"`` (pure jnp) is always available.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax

from seerjax.kernels.checks import KernelInputError, check_attention_inputs, check_block_mask

# name -> (module, function, extra keyword arguments). Modules import lazily so a broken GPU
# lowering of one kernel never stops the others (or the reference) from importing.
_POOLING = {
    "reference": ("seerjax.kernels.reference", "attention_with_pooling_reference", {}),
    "pallas": ("seerjax.kernels.pooling", "attention_with_pooling_pallas", {"interpret": False}),
    "pallas_interpret": ("seerjax.kernels.pooling", "attention_with_pooling_pallas", {"interpret": True}),
    # Mosaic GPU pooled forward on sm_90+ where it was measured faster, else the portable one (kernels/hopper.py).
    "hopper": ("seerjax.kernels.hopper", "attention_with_pooling_sm90", {}),
}
_SPARSE = {
    "reference": ("seerjax.kernels.reference", "block_sparse_attention_reference", {}),
    "pallas": ("seerjax.kernels.block_sparse", "block_sparse_attention_pallas", {"interpret": False}),
    "pallas_interpret": ("seerjax.kernels.block_sparse", "block_sparse_attention_pallas", {"interpret": True}),
    # Mosaic GPU forward on sm_90+ where supported, else the portable kernel (kernels/hopper.py).
    "hopper": ("seerjax.kernels.hopper", "block_sparse_attention_sm90", {}),
}

IMPLEMENTATIONS = tuple(_POOLING)


def default_implementation() -> str:
    """The implementation `implementation=None` resolves to on the current default backend."""
    return "pallas" if jax.default_backend() == "gpu" else "pallas_interpret"


def _resolve(table: dict, implementation: str | None) -> Callable:
    name = default_implementation() if implementation is None else implementation
    if implementation is None and name == "pallas":
        from seerjax.kernels.hopper import is_hopper_device

        if is_hopper_device():  # the Mosaic GPU kernels where they are faster, else the same Triton kernels
            name = "hopper"
    if name not in table:
        raise KernelInputError(f"implementation must be None or one of {sorted(table)}, got {implementation!r}")
    module, fn_name, kwargs = table[name]
    fn = getattr(importlib.import_module(module), fn_name)
    return (lambda *a, **kw: fn(*a, **kw, **kwargs)) if kwargs else fn


def attention_with_pooling(
    q, k, v, *, causal=True, block_size=64, sm_scale=None, lengths=None, return_lse=False, implementation=None
):
    """Softmax attention that also returns the block max-pooled attention probabilities.

    Args:
      q: `[B, T, Hq, D]`; k, v: `[B, S, Hkv, D]` with `Hq % Hkv == 0`, D in {32, 64, 128, 256}.
      causal: bottom-right aligned causal mask (query t sees key s iff s <= t + S - T).
      block_size: pooling block, in {16, 32, 64, 128}.
      sm_scale: logit scale, default `1/sqrt(D)`.
      lengths: optional int `[B]`; positions >= lengths[b] are right padding (T == S required).
      return_lse: also return the float32 log-sum-exp of the scaled logits `[B, Hq, T]`.
      implementation: None (fastest for the platform), "reference", "pallas" or "pallas_interpret".

    Returns:
      `(out, pooled)` or `(out, pooled, lse)`: out `[B, T, Hq, D]` in q's dtype; pooled float32
      `[B, Hq, nq, nk]`, the max softmax probability over query rows of block i and keys of block j.
    """
    shape = check_attention_inputs(q, k, v, causal=causal, block_size=block_size, sm_scale=sm_scale, lengths=lengths)
    fn = _resolve(_POOLING, implementation)
    return fn(q, k, v, shape, lengths=lengths, return_lse=bool(return_lse))


def block_sparse_attention(
    q, k, v, block_mask, *, causal=True, block_size=64, sm_scale=None, lengths=None, implementation=None
):
    """Attention restricted to the selected key blocks of each query block (differentiable).

    Args:
      q: `[B, T, Hq, D]`; k, v: `[B, S, Hkv, D]`.
      block_mask: bool `[B, Hm, nq, nk]`, Hm = Hq (per query head) or Hkv (shared by a GQA group:
        query head h uses mask head `h // (Hq // Hkv)`).
      causal, block_size, sm_scale, lengths, implementation: as `attention_with_pooling`.

    Returns:
      out `[B, T, Hq, D]` in q's dtype; a query row with no visible selected key is zero.
    """
    shape = check_attention_inputs(q, k, v, causal=causal, block_size=block_size, sm_scale=sm_scale, lengths=lengths)
    check_block_mask(block_mask, shape)
    fn = _resolve(_SPARSE, implementation)
    return fn(q, k, v, block_mask, shape, lengths=lengths)
