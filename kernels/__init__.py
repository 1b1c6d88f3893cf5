"""Attention kernels of seerjax: each Pallas kernel beside its pure-jnp reference."""

from seerjax.kernels.api import (
    IMPLEMENTATIONS,
    attention_with_pooling,
    block_sparse_attention,
    default_implementation,
)
from seerjax.kernels.checks import KernelInputError

__all__ = [
    "IMPLEMENTATIONS",
    "KernelInputError",
    "attention_with_pooling",
    "block_sparse_attention",
    "default_implementation",
]
