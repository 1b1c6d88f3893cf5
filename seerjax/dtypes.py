"""Floating-point dtypes accepted for parameters and activations, by object or by name."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from seerjax.errors import SeerjaxError

_BY_NAME = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}
SUPPORTED = tuple(jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def resolve_dtype(dtype, name: str = "dtype") -> jnp.dtype:
    """A jnp/numpy dtype, a scalar type such as `jnp.bfloat16`, or a name → `jnp.dtype`.

    Names are "float32", "bfloat16", "float16" (also "fp32", "bf16", "fp16", and the same prefixed with
    "torch." as HF config.json files write them). Anything else raises a ValueError naming `name`.
    """
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _BY_NAME:
            raise SeerjaxError(f"{name} must be one of {sorted(set(_BY_NAME))} or a jnp dtype, got {dtype!r}")
        return jnp.dtype(_BY_NAME[key])
    try:
        resolved = None if dtype is None else jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved not in SUPPORTED:
        expected = ", ".join(d.name for d in SUPPORTED)
        shown = repr(dtype) if resolved is None else resolved.name
        raise SeerjaxError(f"{name} must be one of {expected} (a jnp dtype or its name), got {shown}")
    return resolved


def numpy_dtype(dtype) -> np.dtype:
    """The numpy dtype of a resolved jnp dtype (bfloat16 is ml_dtypes' numpy type)."""
    return np.dtype(jnp.dtype(dtype))
