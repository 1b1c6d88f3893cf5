"""Block selection: from block scores `[B, H, nq, nk]` to a bool block mask, and the training-free baselines.

Every selector is block-causal (bottom-right aligned: query block i sees key blocks j <= i + nk - nq) and
keeps the diagonal block, so no query row is ever left without a key. Options keep the first key block (the
attention sink) and make the last query blocks dense.

TopK by density gives each query row a budget of blocks such that the budgets add up to `density` times
the visible blocks (floored). By default (`budget="uniform"`) every row gets `k` (or all it sees, if fewer)
and the last rows one more; `budget="proportional"` gives each row about `density` of what it sees. So
the achieved density is the target, not the seed's `int((1 - sqrt(1 - density)) · nq)` per row, which
floors away up to a row's share (0.092 instead of 0.1 at 128 blocks, 0.06 at 32). The diagonal block and,
with `keep_first`, the sink block count toward a row's budget; with `dense_last_rows`, the dense rows' blocks
count toward the total, and the other rows share what is left.

Score sources, all ending in the same TopK so methods compare at matched density:
  * ``seer``: the AttnGate's logits; * ``oracle``: the true block max-pooled attention map;
  * ``streaming`` (StreamingLLM): the sink block plus the nearest blocks;
  * ``vertical_slash`` (MInference): the last query block's attention, summed per key block (vertical)
    and per block diagonal (slash);
  * ``quest``: an upper bound of q·k per key block from its per-channel key min and max;
  * ``moba``: mean-pooled queries against mean-pooled keys.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from seerjax.kernels.topk import kth_largest

NEG = -1e30


class SelectionError(ValueError):
    """Bad selection settings."""


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """How scores become a block mask. Exactly one of `density` and `threshold` is set."""

    density: float | None = 0.1
    threshold: float | None = None
    keep_first: bool = False
    dense_last_rows: int = 0
    budget: str = "uniform"  # how TopK spreads the density over rows: see BUDGETS

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise SelectionError(f"budget must be one of {sorted(BUDGETS)}, got {self.budget!r}")
        if (self.density is None) == (self.threshold is None):
            raise SelectionError(
                f"set exactly one of density and threshold, got density={self.density!r}, threshold={self.threshold!r}"
            )
        if self.density is not None and not 0.0 < float(self.density) <= 1.0:
            raise SelectionError(f"density must be in (0, 1], got {self.density!r}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) < 1.0:
            raise SelectionError(f"threshold must be in [0, 1) (a softmax score), got {self.threshold!r}")
        if self.dense_last_rows < 0:
            raise SelectionError(f"dense_last_rows must be >= 0, got {self.dense_last_rows}")

    @classmethod
    def from_options(cls, options) -> "SelectionConfig":
        """From an attention_config mapping (keys `density`, `threshold`, `keep_first`, `dense_last_rows`)."""
        threshold = options.get("threshold")
        density = options.get("density", None if threshold is not None else 0.1)
        return cls(
            density=density,
            threshold=threshold,
            keep_first=bool(options.get("keep_first", False)),
            dense_last_rows=int(options.get("dense_last_rows", 0)),
            budget=str(options.get("budget", "uniform")),
        )


def causal_blocks(nq: int, nk: int, causal: bool = True) -> jax.Array:
    """Bool `[nq, nk]` of the blocks a query block may see."""
    if not causal:
        return jnp.ones((nq, nk), bool)
    return jnp.arange(nk)[None, :] <= jnp.arange(nq)[:, None] + (nk - nq)


def _seen_per_row(nq: int, nk: int, causal: bool) -> np.ndarray:
    """int64 `[nq]`: the key blocks row i sees, i + 1 + (nk - nq) with causality (bottom-right aligned, at most
    nk), else nk (the row sums of :func:`causal_blocks`, as static numpy)."""
    rows = np.arange(nq, dtype=np.int64)
    return np.minimum(nk, rows + 1 + (nk - nq)) if causal else np.full(nq, nk, np.int64)


def topk_budget(density: float, nq: int) -> int:
    """The seed's per-row block budget for a target density of the causal triangle (for reference; the
    selection uses :func:`row_budgets`)."""
    return max(1, int((1.0 - math.sqrt(1.0 - float(density))) * nq))


def row_budgets(density: float, nq: int, nk: int, causal: bool = True) -> tuple[int, int]:
    """Per-row TopK budgets `(k, r)` for `nq` query rows over `nk` key blocks: rows before `nq - r` keep
    `k` blocks (or every block they see, if fewer), the last `r` rows keep `k + 1`, and the blocks kept add
    up to `floor(density · visible blocks)`, at least one per row. Static ints (shapes are static)."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise SelectionError(f"density must be in (0, 1], got {density!r}")
    seen = _seen_per_row(nq, nk, causal)
    return _uniform_budgets(seen, max(nq, int(math.floor(density * int(seen.sum()) + 1e-9))))


def _uniform_budgets(seen: np.ndarray, target: int) -> tuple[int, int]:
    """`(k, r)` such that rows keeping min(k, seen) blocks, the last r of them one more, add up to `target`
    (at least one block per row). `seen` grows along the rows."""
    seen = seen.tolist()
    target = max(len(seen), target)

    def kept(k):
        return sum(min(k, v) for v in seen)

    lo, hi = 1, max(seen)  # the largest k with kept(k) <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if kept(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    k = lo
    r = min(target - kept(k), sum(v > k for v in seen))
    # Rows seeing more than k blocks are the last ones (v_i grows with i), and there are more than r of them
    # unless every row keeps all it sees (target >= every visible block).
    return k, r


def proportional_budgets(density: float, nq: int, nk: int, causal: bool = True) -> np.ndarray:
    """Per-row TopK budgets, int32 `[nq]`, each row's close to `density` times the blocks it sees (at least
    one, at most all), adding up to `floor(density · visible blocks)` like :func:`row_budgets`' (more only
    where every row's one block already exceeds it).

    Row i's budget is the rounding step of the running total: `floor(d · V_i) - floor(d · V_{i-1})` with V_i
    the blocks rows 0..i see, so no row is more than one block off its share. Rows whose step is 0 keep one
    block (the diagonal); the blocks that costs come off the rows with the largest budgets, latest first."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise SelectionError(f"density must be in (0, 1], got {density!r}")
    return _proportional_budgets(density, _seen_per_row(nq, nk, causal))


def _proportional_budgets(density: float, seen: np.ndarray) -> np.ndarray:
    cum = np.floor(density * np.cumsum(seen) + 1e-9).astype(np.int64)
    k = np.minimum(np.maximum(np.diff(cum, prepend=0), 1), seen)
    target = max(len(seen), int(cum[-1]))
    excess = int(k.sum()) - target
    while excess > 0:  # a few blocks at most (one per row whose share is under one block)
        top = int(np.flatnonzero(k == k.max())[-1])
        if k[top] <= 1:
            break
        k[top] -= 1
        excess -= 1
    return k.astype(np.int32)


# How TopK spreads a density over the query rows of a causal mask (both add up to the same block count):
#   uniform: every row keeps the same k (the seed's rule, made exact): early rows see few blocks and keep
#            them all, late rows keep a smaller share of their context;
#   proportional: every row keeps about `density` of the blocks it sees, so the last rows (the prompt's
#            end, which predicts the first generated token) keep as large a share as every other row.
BUDGETS = ("uniform", "proportional")


def row_k(density: float, nq: int, nk: int, causal: bool = True, budget: str = "uniform", dense_last_rows: int = 0):
    """The TopK budget of each row as :func:`kth_largest` takes it: an int when every row has the same,
    else an int32 `[nq]` (uniform: `k`, and `k + 1` in the last `r` rows of :func:`row_budgets`;
    proportional: :func:`proportional_budgets`).

    With `dense_last_rows = m`, the last m rows keep every block they see, and those blocks come out of the
    same total: the other rows share `floor(density · visible blocks)` minus the dense rows' blocks (at least
    one block each), so the achieved density stays the target."""
    if budget not in BUDGETS:
        raise SelectionError(f"budget must be one of {sorted(BUDGETS)}, got {budget!r}")
    m = min(int(dense_last_rows), nq)
    if m == 0:
        if budget == "proportional":
            return proportional_budgets(density, nq, nk, causal)
        k, r = row_budgets(density, nq, nk, causal)
        return k if r == 0 else np.where(np.arange(nq) >= nq - r, k + 1, k).astype(np.int32)
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise SelectionError(f"density must be in (0, 1], got {density!r}")
    seen = _seen_per_row(nq, nk, causal)
    rest, dense = seen[: nq - m], seen[nq - m :]
    out = np.empty(nq, np.int32)
    out[nq - m :] = dense
    if rest.size:
        target = max(nq, int(math.floor(density * int(seen.sum()) + 1e-9))) - int(dense.sum())
        target = max(int(rest.size), target)
        if budget == "proportional":
            out[: nq - m] = _proportional_budgets(min(1.0, target / int(rest.sum())), rest)
        else:
            k, r = _uniform_budgets(rest, target)
            out[: nq - m] = np.minimum(np.where(np.arange(rest.size) >= rest.size - r, k + 1, k), rest)
    return out


def _finish(mask, nq, nk, cfg: SelectionConfig, causal: bool, key_blocks_valid=None):
    allowed = causal_blocks(nq, nk, causal)[None, None]
    if key_blocks_valid is not None:
        allowed = allowed & key_blocks_valid[:, None, None, :]
    diag = jnp.arange(nk)[None, :] == jnp.arange(nq)[:, None] + (nk - nq)
    mask = mask | diag[None, None]
    if cfg.keep_first:
        mask = mask.at[..., 0].set(True)
    if cfg.dense_last_rows:
        mask = mask | (jnp.arange(nq) >= nq - cfg.dense_last_rows)[None, None, :, None]
    return mask & allowed


# Kernel implementation names (the attention config's `implementation`) → k-th value implementation.
_KTH_IMPL = {None: None, "reference": "top_k", "pallas": "pallas", "pallas_interpret": "pallas_interpret", "hopper": "pallas"}


def select_blocks(
    scores,
    cfg: SelectionConfig,
    *,
    causal: bool = True,
    key_blocks_valid=None,
    implementation: str | None = None,
    premasked: bool = False,
) -> jax.Array:
    """Bool block mask `[B, H, nq, nk]` from scores (higher = more important; any scale for TopK,
    softmax probabilities for a threshold). `key_blocks_valid` `[B, nk]` marks blocks with real tokens.

    `implementation` picks how TopK finds each row's k-th score: None (a Pallas kernel on GPU, `lax.top_k`
    elsewhere), a kernel name ("reference" → `lax.top_k`, "pallas", "pallas_interpret"), or a name of
    :func:`seerjax.kernels.topk.kth_largest`. All give the same mask.

    `premasked=True` promises that every block outside the causal/padding visibility already scores at
    most -1e30 (the AttnGate's masked logits do): the scores are then used as they are, which saves a
    pass over them (at 128k tokens, 1 GB of traffic per layer)."""
    b, h, nq, nk = scores.shape
    if premasked:
        scores = scores.astype(jnp.float32)
    else:
        allowed = causal_blocks(nq, nk, causal)[None, None]
        if key_blocks_valid is not None:
            allowed = allowed & key_blocks_valid[:, None, None, :]
        scores = jnp.where(allowed, scores.astype(jnp.float32), NEG)
    if cfg.threshold is not None:
        mask = scores > cfg.threshold
    else:
        kk = row_k(cfg.density, nq, nk, causal, cfg.budget, cfg.dense_last_rows)
        if isinstance(kk, int) and kk >= nk:  # (a per-row k means some rows keep fewer than nk)
            mask = jnp.ones(scores.shape, bool)
        else:
            # The forced blocks (the diagonal, the sink with keep_first) count toward each row's budget:
            # they rank above every score. The last r rows keep one block more.
            forced = jnp.arange(nk)[None, :] == jnp.arange(nq)[:, None] + (nk - nq)
            if cfg.keep_first:
                forced = forced | (jnp.arange(nk) == 0)[None, :]
            scores = jnp.where(forced[None, None], -NEG, scores)
            # The k-th largest score per row; ties at it may keep a few more than k (never fewer). A full
            # sort to break ties would cost more than the gate itself at 128k tokens; on GPU even XLA's
            # top_k sorts, so a Pallas kernel finds the k-th value by bisection in registers.
            if not isinstance(kk, int):
                kk = np.broadcast_to(kk, (b, h, nq))
            kth = kth_largest(scores, kk, implementation=_KTH_IMPL.get(implementation, implementation))
            mask = scores >= kth[..., None]
    return _finish(mask, nq, nk, cfg, causal, key_blocks_valid)


def achieved_density(mask, *, causal: bool = True, key_blocks_valid=None) -> jax.Array:
    """Selected share of the visible blocks, per batch and head: float32 `[B, H]`."""
    b, h, nq, nk = mask.shape
    allowed = causal_blocks(nq, nk, causal)[None, None]
    if key_blocks_valid is not None:
        allowed = allowed & key_blocks_valid[:, None, None, :]
    allowed = jnp.broadcast_to(allowed, mask.shape)
    return jnp.sum(mask & allowed, axis=(2, 3)) / jnp.maximum(jnp.sum(allowed, axis=(2, 3)), 1)


# -- training-free score sources ----------------------------------------------------------------------


def _pool_mean(x_bthd, bs, lengths=None):
    from seerjax.gate import pool_blocks

    return pool_blocks(x_bthd, bs, ("avg",), lengths)  # [B, n, H, D]


def _group(q_bnhd, hkv):
    """Mean over the query heads of each KV group: `[B, n, Hq, D]` → `[B, n, Hkv, D]`."""
    b, n, hq, d = q_bnhd.shape
    return q_bnhd.reshape(b, n, hkv, hq // hkv, d).mean(axis=3)


def streaming_scores(b, h, nq, nk) -> jax.Array:
    """Sink block first, then blocks by closeness to the diagonal."""
    i = jnp.arange(nq)[:, None] + (nk - nq)
    j = jnp.arange(nk)[None, :]
    score = -(i - j).astype(jnp.float32)
    score = jnp.where(j == 0, 1e9, score)
    return jnp.broadcast_to(score, (b, h, nq, nk))


def quest_scores(q_bthd, k_bshd, bs, lengths=None) -> jax.Array:
    """Per query block (mean query) the upper bound Σ_c max(q_c·kmin_c, q_c·kmax_c) over each key block."""
    from seerjax.gate import pool_blocks

    hkv = k_bshd.shape[2]
    qm = _group(_pool_mean(q_bthd, bs, lengths), hkv)  # [B, nq, Hkv, D]
    kmm = pool_blocks(k_bshd, bs, ("min", "max"), lengths)  # [B, nk, Hkv, 2D]
    d = q_bthd.shape[-1]
    kmin, kmax = kmm[..., :d], kmm[..., d:]
    s = jnp.maximum(qm[:, :, None] * kmin[:, None], qm[:, :, None] * kmax[:, None]).sum(-1)  # [B, nq, nk, Hkv]
    return jnp.transpose(s, (0, 3, 1, 2))


def moba_scores(q_bthd, k_bshd, bs, lengths=None) -> jax.Array:
    """Mean-pooled queries · mean-pooled keys per block, per KV head."""
    hkv = k_bshd.shape[2]
    qm = _group(_pool_mean(q_bthd, bs, lengths), hkv)
    km = _pool_mean(k_bshd, bs, lengths)
    return jnp.einsum("bihd,bjhd->bhij", qm, km, precision=jax.lax.Precision.HIGHEST)


def vertical_slash_scores(q_bthd, k_bshd, bs, sm_scale, lengths=None) -> jax.Array:
    """MInference's estimate: attention of the last query block to all keys, per KV group; a block's score
    is its vertical mass (its key columns) plus the mass of its block diagonal (slash)."""
    b, t, hq, d = q_bthd.shape
    s_len, hkv = k_bshd.shape[1], k_bshd.shape[2]
    nq, nk = -(-t // bs), -(-s_len // bs)
    last = min(bs, t)
    q_last = q_bthd[:, t - last :].astype(jnp.float32).reshape(b, last, hkv, hq // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_last, k_bshd.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    logits = logits * sm_scale
    t_pos = jnp.arange(t - last, t)[:, None] + (s_len - t)
    s_pos = jnp.arange(s_len)[None, :]
    vis = s_pos <= t_pos
    if lengths is not None:
        vis = vis[None] & (s_pos[None] < lengths[:, None, None])
        vis = vis[:, None, None]
    probs = jax.nn.softmax(jnp.where(vis, logits, NEG), axis=-1)
    col = probs.mean(axis=(2, 3))  # [B, Hkv, S]
    col = jnp.pad(col, ((0, 0), (0, 0), (0, nk * bs - s_len)))
    vertical = col.reshape(b, hkv, nk, bs).sum(-1)  # [B, Hkv, nk]
    # Slash: mass per block-diagonal offset o = (last query block) - j, measured on the last block row.
    off = jnp.arange(nk)[::-1]  # offset of key block j from the last query block's diagonal
    slash_by_offset = jnp.zeros((b, hkv, nk)).at[:, :, off].set(vertical)
    i = jnp.arange(nq)[:, None] + (nk - nq)
    j = jnp.arange(nk)[None, :]
    offset = jnp.clip(i - j, 0, nk - 1)
    slash = slash_by_offset[:, :, offset]  # [B, Hkv, nq, nk]
    return vertical[:, :, None, :] + slash
