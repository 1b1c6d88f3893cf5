"""seerjax: SeerAttention (learned block-sparse attention) for long-context LLMs in JAX."""

__version__ = "0.1.0"
