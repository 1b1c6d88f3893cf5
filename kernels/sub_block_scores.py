"""The gate's block scores at sub-block grain: each block's best score over its sub-block pairs (Pallas, Triton).

With `q_sub_blocks = mq` and `k_sub_blocks = mk` (:mod:`seerjax.gate`) the gate holds one vector per sub-block of
`block_size / mq` queries and `block_size / mk` keys, and the logit of block pair (i, j) is the largest score
q_{i,a} · k_{j,b} over the sub-block pairs (a, b) that are allowed: the key sub-block starts at or before the query
sub-block's last token (causal, bottom-right aligned by tokens), and both hold a valid token. A block with no
allowed pair scores 0 (it is masked at block level, or is a padding row).

Done in XLA, the `[B, H, nq·mq, nk·mk]` float32 scores go to memory, are masked and max-reduced: at 131,072
tokens with 32 heads and 8 × 8 sub-blocks that is 34 GB per layer (scored chunk by chunk to bound memory) and
51 ms per layer on an H100, against 1.3 ms for whole-block scores. The kernel never writes them: a program
holds a `[TQ, TK]` tile of block logits and, for each (a, b), one `[TQ, d] · [d, TK]` dot of sub-block a of TQ
query blocks against sub-block b of TK key blocks, masked where needed and max-accumulated. Tiles above the
causal diagonal are skipped. Vectors are laid out sub-block major (`[B, H, mq, nq, d]`), so each operand of a
dot is one contiguous `[TQ, d]` slab. Key heads are read through the index map (`h // (H / Hk)`), never
repeated in memory.

The kernel is forward-only; :func:`sub_block_scores` gives it a custom VJP whose backward is the XLA version's
(distillation differentiates through the gate's parameters; inference never runs it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

IMPLEMENTATIONS = ("pallas", "pallas_interpret", "xla")
NEG_INF = -1e30
SCORE_BYTES = 1 << 28  # XLA version: sub-block scores held at once; more query blocks go chunk by chunk


class SubBlockScoreError(ValueError):
    """Bad arguments to sub-block scoring."""


def _check(qg, kg, t, s, sq, sk, mq, mk):
    if qg.ndim != 4 or kg.ndim != 4:
        raise SubBlockScoreError(f"qg and kg must be [B, n, H, d], got shapes {tuple(qg.shape)} and {tuple(kg.shape)}")
    b, nqm, h, d = qg.shape
    bk, nkm, hk, dk = kg.shape
    if (b, d) != (bk, dk) or h % hk:
        raise SubBlockScoreError(
            f"qg {tuple(qg.shape)} and kg {tuple(kg.shape)} must share batch and width, and kg's heads must divide qg's"
        )
    if nqm % mq or nkm % mk:
        raise SubBlockScoreError(f"qg rows ({nqm}) and kg rows ({nkm}) must be multiples of mq={mq} and mk={mk}")
    if not (0 < t <= nqm * sq and 0 < s <= nkm * sk and t <= s):
        raise SubBlockScoreError(f"token counts t={t}, s={s} do not fit {nqm} query and {nkm} key sub-blocks")


def _allowed(q_first, k_first, *, t, s, sq, q_len, k_len, causal: bool):
    """Bool of broadcast shape: the (query sub-block, key sub-block) pair counts."""
    ok = (q_first < q_len) & (k_first < k_len)
    if causal:
        ok = ok & (k_first <= jnp.minimum(q_first + (sq - 1), t - 1) + (s - t))
    return ok


def _valid_lengths(b: int, t: int, s: int, lengths):
    """Valid query and key tokens per sequence, int32 `[B]` each (right padding: `lengths`, capped at t and s)."""
    if lengths is None:
        return jnp.full((b,), t, jnp.int32), jnp.full((b,), s, jnp.int32)
    lengths = lengths.astype(jnp.int32)
    return jnp.minimum(lengths, t), jnp.minimum(lengths, s)


def sub_block_scores_xla(qg, kg, *, t, s, sq, sk, mq, mk, lengths=None, causal=True):
    """XLA version: scores `[.., nq·mq, nk·mk]` in float32, masked, max-reduced; chunked past SCORE_BYTES."""
    _check(qg, kg, t, s, sq, sk, mq, mk)
    q_len, k_len = _valid_lengths(qg.shape[0], t, s, lengths)
    return _xla_scores(qg, kg, q_len, k_len, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, causal=causal)


def _xla_scores(qg, kg, q_len, k_len, *, t, s, sq, sk, mq, mk, causal):
    b, nqm, h, d = qg.shape
    if kg.shape[2] != h:
        kg = jnp.repeat(kg, h // kg.shape[2], axis=2)
    nkm = kg.shape[1]
    nq, nk = nqm // mq, nkm // mk
    per_block = b * h * mq * nkm * 4 * 3  # float32 scores, mask and max, per query block
    chunk = max(1, min(nq, SCORE_BYTES // per_block))
    n_chunks = -(-nq // chunk)
    pad = n_chunks * chunk - nq
    if pad:
        qg = jnp.pad(qg, ((0, 0), (0, pad * mq), (0, 0), (0, 0)))
    q_first = jnp.arange((nq + pad) * mq) * sq  # padded sub-blocks start past t: invalid, sliced off below
    k_first = jnp.arange(nkm) * sk
    precision = lax.Precision.HIGHEST if qg.dtype == jnp.float32 else None

    def score(args):
        q_c, first = args  # [B, chunk·mq, H, d], [chunk·mq]
        logits = jnp.einsum("bihd,bjhd->bhij", q_c, kg, precision=precision, preferred_element_type=jnp.float32)
        ok = _allowed(first[None, :, None], k_first[None, None, :], t=t, s=s, sq=sq,
                      q_len=q_len[:, None, None], k_len=k_len[:, None, None], causal=causal)
        pairs = jnp.where(ok[:, None], logits, NEG_INF).reshape(b, h, first.shape[0] // mq, mq, nk, mk)
        best = jnp.max(pairs, axis=(3, 5))
        return jnp.where(best > NEG_INF / 2, best, 0.0)  # [B, H, chunk, nk]

    if n_chunks == 1:
        return score((qg, q_first))[:, :, :nq]
    q_chunks = jnp.moveaxis(qg.reshape(b, n_chunks, chunk * mq, h, d), 1, 0)
    out = lax.map(jax.checkpoint(score), (q_chunks, q_first.reshape(n_chunks, chunk * mq)))  # [n, B, H, chunk, nk]
    return jnp.moveaxis(out, 0, 2).reshape(b, h, n_chunks * chunk, nk)[:, :, :nq]


def _kernel(qlen_ref, klen_ref, q_ref, k_ref, o_ref, *, t, s, sq, sk, mq, mk, tq, tk, bs, causal):
    """One `[tq, tk]` tile of block logits from q `[mq, tq, d]` and k `[mk, tk, d]` sub-block slabs."""
    i0 = pl.program_id(2) * tq
    j0 = pl.program_id(3) * tk
    q_len, k_len = qlen_ref[...], klen_ref[...]
    qi = i0 + lax.broadcasted_iota(jnp.int32, (tq, 1), 0)  # query block of each row
    kj = j0 + lax.broadcasted_iota(jnp.int32, (1, tk), 1)  # key block of each column

    def compute():
        shift = mk.bit_length() - 1  # mk divides a power-of-2 block size: a power of 2 itself

        def step(idx, acc):
            a, b = lax.shift_right_logical(idx, jnp.int32(shift)), lax.bitwise_and(idx, jnp.int32(mk - 1))
            q = q_ref[a]  # [tq, d]
            k = k_ref[b]  # [tk, d]
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
            ok = _allowed((qi * mq + a) * sq, (kj * mk + b) * sk, t=t, s=s, sq=sq, q_len=q_len, k_len=k_len,
                          causal=causal)
            return jnp.maximum(acc, jnp.where(ok, sc, NEG_INF))

        acc = lax.fori_loop(jnp.int32(0), jnp.int32(mq * mk), step, jnp.full((tq, tk), NEG_INF, jnp.float32))
        o_ref[...] = jnp.where(acc > NEG_INF / 2, acc, 0.0)

    if causal:  # the tile's first key token against its last query token
        last_q = jnp.minimum((i0 + tq) * bs - 1, t - 1) + (s - t)
        needed = j0 * bs <= last_q

        @pl.when(needed)
        def _():
            compute()

        @pl.when(jnp.logical_not(needed))
        def _():
            o_ref[...] = jnp.zeros((tq, tk), jnp.float32)
    else:
        compute()


def _tile(n: int) -> int:
    """Query / key blocks per program: 64, or the next power of 2 ≥ n (at least 16, Triton's smallest dot)."""
    return max(16, min(64, 1 << max(0, (n - 1).bit_length())))


def _pallas_forward(qg, kg, q_len, k_len, *, t, s, sq, sk, mq, mk, causal, interpret, launch=None):
    """`launch` = (tq, tk, num_warps, num_stages) overrides the launch shape (for tuning)."""
    b, nqm, h, d = qg.shape
    nkm, hk = kg.shape[1], kg.shape[2]
    nq, nk = nqm // mq, nkm // mk
    tq, tk, warps, stages = (_tile(nq), _tile(nk), 4, 2) if launch is None else launch
    nq_p, nk_p = -(-nq // tq) * tq, -(-nk // tk) * tk
    # Sub-block major: [B, H, m, n, d], padded to whole tiles (padded blocks start past t, s: invalid).
    qs = jnp.pad(qg.reshape(b, nq, mq, h, d).transpose(0, 3, 2, 1, 4), ((0, 0),) * 3 + ((0, nq_p - nq), (0, 0)))
    ks = jnp.pad(kg.reshape(b, nk, mk, hk, d).transpose(0, 3, 2, 1, 4), ((0, 0),) * 3 + ((0, nk_p - nk), (0, 0)))
    rep = h // hk
    kernel = functools.partial(_kernel, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, tq=tq, tk=tk, bs=sq * mq, causal=causal)
    out = pl.pallas_call(
        kernel,
        grid=(b, h, nq_p // tq, nk_p // tk),
        in_specs=[
            pl.BlockSpec((None,), lambda bb, hh, i, j: (bb,)),
            pl.BlockSpec((None,), lambda bb, hh, i, j: (bb,)),
            pl.BlockSpec((None, None, mq, tq, d), lambda bb, hh, i, j: (bb, hh, 0, i, 0)),
            pl.BlockSpec((None, None, mk, tk, d), lambda bb, hh, i, j: (bb, hh // rep, 0, j, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, tq, tk), lambda bb, hh, i, j: (bb, hh, i, j)),
        out_shape=jax.ShapeDtypeStruct((b, h, nq_p, nk_p), jnp.float32),
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
        name="seerjax_sub_block_scores",
    )(q_len, k_len, qs, ks)
    return out[:, :, :nq, :nk]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10, 11))
def _scores(qg, kg, q_len, k_len, t, s, sq, sk, mq, mk, causal, interpret):
    return _pallas_forward(qg, kg, q_len, k_len, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, causal=causal, interpret=interpret)


def _scores_fwd(qg, kg, q_len, k_len, t, s, sq, sk, mq, mk, causal, interpret):
    out = _scores(qg, kg, q_len, k_len, t, s, sq, sk, mq, mk, causal, interpret)
    return out, (qg, kg, q_len, k_len)


def _scores_bwd(t, s, sq, sk, mq, mk, causal, interpret, res, g):
    qg, kg, q_len, k_len = res

    def xla(q_, k_):
        return _xla_scores(q_, k_, q_len, k_len, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, causal=causal)

    _, vjp = jax.vjp(xla, qg, kg)
    dq, dk = vjp(g)
    return dq, dk, None, None


_scores.defvjp(_scores_fwd, _scores_bwd)


def sub_block_scores(qg, kg, *, t, s, sq, sk, mq, mk, lengths=None, causal=True, implementation=None):
    """Block logits `[B, H, nq, nk]` (float32) from sub-block gate vectors.

    Args:
      qg: `[B, nq·mq, H, d]` query sub-block vectors (scaled, RoPE'd; bf16 or float32).
      kg: `[B, nk·mk, Hk, d]` key sub-block vectors, Hk dividing H (each serves H / Hk query heads).
      t, s: query and key token counts; sq, sk: sub-block sizes; mq, mk: sub-blocks per block.
      lengths: optional `[B]` valid tokens (t == s, right padding).
      implementation: None (the kernel on GPU when d is a power of 2 ≥ 16, else XLA), "pallas",
        "pallas_interpret" or "xla".
    """
    _check(qg, kg, t, s, sq, sk, mq, mk)
    if lengths is not None and t != s:
        raise SubBlockScoreError(f"lengths (right padding) needs as many queries as keys, got t={t}, s={s}")
    d = qg.shape[-1]
    if implementation is None:
        fits = d >= 16 and not d & (d - 1)
        implementation = "pallas" if jax.default_backend() == "gpu" and fits else "xla"
    if implementation == "xla":
        return sub_block_scores_xla(qg, kg, t=t, s=s, sq=sq, sk=sk, mq=mq, mk=mk, lengths=lengths, causal=causal)
    if implementation not in ("pallas", "pallas_interpret"):
        raise SubBlockScoreError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    q_len, k_len = _valid_lengths(qg.shape[0], t, s, lengths)
    return _scores(qg, kg.astype(qg.dtype), q_len, k_len, t, s, sq, sk, mq, mk, causal, implementation == "pallas_interpret")
