"""seerjax: SeerAttention (learned block-sparse attention) for long-context LLMs in JAX."""

__version__ = "0.1.0"

from seerjax.config import ModelConfig
from seerjax.hf import from_pretrained, save_pretrained
from seerjax.model import LlamaModel

__all__ = ["LlamaModel", "ModelConfig", "__version__", "from_pretrained", "save_pretrained"]

# Registers the SeerAttention attention functions ("pooled", "seer", "oracle" and the baselines) on the seam.
from seerjax import sparse_attention as _sparse_attention  # noqa: E402,F401
