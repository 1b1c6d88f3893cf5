"""The k-th largest value of each row, in one read of the scores (Pallas, Triton lowering).

Block selection by TopK needs, per row of gate scores, only the k-th largest value: the mask is then
`scores >= kth`. XLA's `lax.top_k` sorts on GPU; at 128k tokens a layer's scores are `[32, 2048, 2048]`
and the sort costs more than the gate. Here each program holds a few whole rows in registers and finds the
k-th value by bisection on the bits of an order-preserving integer key: 32 rounds of compare-and-count over
registers, one read of the scores, one float per row written.

The result is exactly `lax.top_k(x, k)[0][..., -1]` for every input without NaN (ties included: the k-th
largest counts repeated values), so the mask built from it is the same bit for bit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

_SIGN = -(2**31)  # int32 with only the sign bit set
_LOW = 2**31 - 1  # int32 with every bit but the sign set


class TopKError(ValueError):
    """Bad arguments to the k-th value kernel."""


def _order_key(x_f32):
    """int32 whose signed order is the float order (for non-NaN floats; -0.0 < +0.0)."""
    bits = lax.bitcast_convert_type(x_f32, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(_LOW), bits)


def _from_order_key(key_i32):
    bits = jnp.where(key_i32 < 0, key_i32 ^ jnp.int32(_LOW), key_i32)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _kth_of_keys(key, k):
    """Per row of int32 keys `[R, N]`, the largest t with count(key >= t) >= k: the k-th largest key.
    `k` is an int or an int32 `[R]` (one budget per row)."""
    kk = jnp.asarray(k, jnp.int32)

    def count_ge(t):
        return jnp.sum((key >= t[:, None]).astype(jnp.int32), axis=1)

    # The sign bit first: in two's complement, setting lower bits only raises the value once it is fixed.
    ans = jnp.where(count_ge(jnp.zeros(key.shape[:1], jnp.int32)) >= kk, jnp.int32(0), jnp.int32(_SIGN))
    for bit in range(30, -1, -1):
        cand = ans | jnp.int32(1 << bit)
        ans = jnp.where(count_ge(cand) >= kk, cand, ans)
    return ans


def kth_largest_jnp(x, k):
    """The same bisection in plain jnp (reads `x` 32 times; the readable specification of the kernel).
    `k`: an int, or an int array of shape `x.shape[:-1]`."""
    key = _order_key(x.astype(jnp.float32).reshape(-1, x.shape[-1]))
    kk = k if isinstance(k, int) else jnp.asarray(k, jnp.int32).reshape(-1)
    return _from_order_key(_kth_of_keys(key, kk)).reshape(x.shape[:-1])


def _kernel(x_ref, o_ref, *, k: int):
    o_ref[...] = _from_order_key(_kth_of_keys(_order_key(x_ref[...]), k))


def _kernel_row_k(x_ref, k_ref, o_ref):
    o_ref[...] = _from_order_key(_kth_of_keys(_order_key(x_ref[...]), k_ref[...]))


def _rows_per_program(n_pad: int) -> int:
    # About 8k floats per program (64 per thread at 4 warps); at least one row.
    return max(1, min(64, 8192 // n_pad))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _kth_largest_pallas_rows(x, k, *, interpret: bool = False):
    return _pallas_call(x, k, interpret)


@functools.partial(jax.jit, static_argnames=("k", "interpret"))
def kth_largest_pallas(x, k: int, *, interpret: bool = False):
    """`lax.top_k(x, k)[0][..., -1]` for float `x` `[..., N]` (no NaN), as float32 `[...]`."""
    return _pallas_call(x, k, interpret)


def _pallas_call(x, k, interpret):
    lead, n = x.shape[:-1], x.shape[-1]
    rows = 1
    for d in lead:
        rows *= d
    n_pad = 1 << max(0, (n - 1).bit_length())
    r = _rows_per_program(n_pad)
    rows_pad = -(-max(rows, 1) // r) * r
    flat = x.astype(jnp.float32).reshape(rows, n)
    # Padding below every real value (-inf) never changes a k-th largest with k <= N.
    flat = jnp.pad(flat, ((0, rows_pad - rows), (0, n_pad - n)), constant_values=-jnp.inf)
    in_specs = [pl.BlockSpec((r, n_pad), lambda i: (i, 0))]
    args = [flat]
    if isinstance(k, int):
        kernel = functools.partial(_kernel, k=k)
    else:
        # One budget per row, read beside the row (padding rows ask for the largest value).
        kernel = _kernel_row_k
        in_specs.append(pl.BlockSpec((r,), lambda i: (i,)))
        args.append(jnp.pad(jnp.asarray(k, jnp.int32).reshape(rows), (0, rows_pad - rows), constant_values=1))
    out = pl.pallas_call(
        kernel,
        grid=(rows_pad // r,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((r,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((rows_pad,), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="seerjax_kth_largest",
    )(*args)
    return out[:rows].reshape(lead)


def _check_k(k, x) -> int | None:
    """Raise a TopKError for a bad k; return the largest k when it is known (an int or a concrete array)."""
    n = x.shape[-1]
    if isinstance(k, int) and not isinstance(k, bool):
        if not 1 <= k <= n:
            raise TopKError(f"k must be an int in [1, {n}] (the last axis of x), got {k!r}")
        return k
    if isinstance(k, (bool, float)) or not hasattr(k, "shape") or not jnp.issubdtype(k.dtype, jnp.integer):
        raise TopKError(f"k must be an int in [1, {n}] (the last axis of x) or an int array of shape {x.shape[:-1]}, got {k!r}")
    if tuple(k.shape) != tuple(x.shape[:-1]):
        raise TopKError(f"a per-row k must have the shape of x without its last axis {x.shape[:-1]}, got {k.shape}")
    try:
        lo, hi = int(np.min(k)), int(np.max(k))
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None  # traced: the caller vouches for the range
    if k.size and not (1 <= lo and hi <= n):
        raise TopKError(f"every per-row k must be in [1, {n}] (the last axis of x), got values in [{lo}, {hi}]")
    return hi


def kth_largest(x, k, *, implementation: str | None = None):
    """The k-th largest value along the last axis (float32), for TopK block selection.

    k: an int, or an int array of shape `x.shape[:-1]` with one budget per row.
    implementation: None (the Pallas kernel on GPU, `lax.top_k` elsewhere), "pallas", "pallas_interpret",
    "bisect" (the jnp bisection) or "top_k".
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TopKError(f"x must be a float array, got dtype {x.dtype}")
    kmax = _check_k(k, x)
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" else "top_k"
    per_row = not isinstance(k, int)
    if implementation == "pallas":
        return _kth_largest_pallas_rows(x, k) if per_row else kth_largest_pallas(x, k)
    if implementation == "pallas_interpret":
        return _kth_largest_pallas_rows(x, k, interpret=True) if per_row else kth_largest_pallas(x, k, interpret=True)
    if implementation == "bisect":
        return kth_largest_jnp(x, k)
    if implementation == "top_k":
        if not per_row:
            return lax.top_k(x.astype(jnp.float32), k)[0][..., -1]
        top = lax.top_k(x.astype(jnp.float32), x.shape[-1] if kmax is None else kmax)[0]
        return jnp.take_along_axis(top, jnp.asarray(k, jnp.int32)[..., None] - 1, axis=-1)[..., 0]
    raise TopKError(f"implementation must be None, 'pallas', 'pallas_interpret', 'bisect' or 'top_k', got {implementation!r}")
