"""Block-sparse flash attention backward for Hopper (sm_90) in Pallas Mosaic GPU: dq, and dk/dv.

Same semantics as the portable backward (:func:`seerjax.kernels.block_sparse._backward`). It takes the forward's
residuals: padded q, k, v and the output, the base-2 log-sum-exp (`+inf` on rows that see no key), the row
lists and the block tables; it computes `delta = rowsum(dO · O)` and the transposed lists itself. Block size 64,
head_dim 64 or 128, bf16/fp16. Launch options: :class:`BwdPlan`; the dispatch's: :func:`tuned_bwd_plan`.

* **dq** — grid (query block, query heads / dq_consumers, batch); `dq_consumers` compute warpgroups (a 64-row
  tile of one query head each; with 2, two heads of one GQA group that share the row list) and one producer.
  The producer walks the row list and fetches K and V of each listed key block by TMA into a ring, once for
  all compute warpgroups; per block each computes S = Q Kᵀ and dP = dO Vᵀ (wgmma, Q and dO resident in shared
  memory), P = exp2(S·scale·log2 e − lse), dS = P ⊙ (dP − delta), dQ += dS K (dS from registers).
* **dk, dv** — grid (key block, KV head or query head, batch): one 64-key tile of K and V resident in shared
  memory; the producer walks the transposed list (the query blocks that selected this key block for the
  head's mask head) and fetches Q, dO, lse and delta of each; per block Sᵀ = K Qᵀ, Pᵀ, dV += Pᵀ dO, dPᵀ = V dOᵀ,
  dSᵀ, dK += dSᵀ Q. With `kv_loop` the CTA walks the G query heads of its KV head one after the other (the
  ring runs on across them) and writes the KV head's dk, dv; without it each query head writes its own partial
  (in the input dtype) and XLA sums the G partials of a KV head. The transposed lists put masked tiles first
  (the diagonal) and last (padding): `[0, lo)` and `[hi, count)` build the element mask, `[lo, hi)` do not.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from seerjax.kernels.checks import AttentionShape
from seerjax.kernels.hopper import (
    _kernel_call, acc_dot, dot_nt, kv_streams, layout_helpers, plgpu, ring_drain, ring_producer, visible,
)

LOG2_E = math.log2(math.e)
ROWS = 64  # the tile of both kernels: 64 query rows (dq) or 64 keys (dk/dv), one wgmma M tile
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def hopper_bwd_supported(shape: AttentionShape, mask_heads: int, dtype) -> bool:
    """Whether :func:`backward_hopper` handles this call: bf16/fp16, block 64, head_dim 64 or 128."""
    return (
        plgpu is not None
        and jnp.dtype(dtype) in SUPPORTED_DTYPES
        and shape.block_size == ROWS
        and shape.head_dim in (64, 128)
        and mask_heads in (shape.q_heads, shape.kv_heads)
    )


@dataclasses.dataclass(frozen=True)
class BwdPlan:
    """Static launch facts of one backward call.

    Attributes:
      shape, mask_heads, has_lengths: the call (mask heads Hq or Hkv; right-padding lengths given).
      stages: ring depth of both kernels' streamed tiles (>= 2).
      dq_consumers: dq compute warpgroups per CTA (1 or 2). With 2 (per-KV-head masks, an even number of
        query heads per mask head) the two warpgroups take two query heads of one GQA group, which share the
        row list, and the producer streams each K/V block once for both: half the K/V traffic into shared memory.
      kv_loop: one dk/dv CTA per (key block, KV head) that walks the G query heads of the group one after the
        other, accumulating dk and dv over them in registers, and writes the KV head's gradients itself. Without
        it a CTA per (key block, query head) writes that head's partial and XLA sums the G partials.
      auto_barriers: Pallas' warpgroup barrier around every shared-memory store (its default). Neither kernel
        needs one: their only shared-memory stores are the final gradient tiles, written after every wgmma
        that read the buffer was waited for and followed by `commit_smem` before the TMA store.
    """

    shape: AttentionShape
    mask_heads: int
    has_lengths: bool
    stages: int = 2
    dq_consumers: int = 1
    kv_loop: bool = False
    auto_barriers: bool = True

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.dq_consumers not in (1, 2) or self.share % self.dq_consumers:
            raise ValueError(
                f"dq_consumers must be 1 or 2 and divide the {self.share} query heads per mask head, "
                f"got {self.dq_consumers}"
            )

    @property
    def share(self) -> int:
        """Query heads per mask head."""
        return self.shape.q_heads // self.mask_heads

    @property
    def dkdv_heads(self) -> int:
        """Query heads one dk/dv CTA walks: the GQA group with `kv_loop`, else 1."""
        return self.shape.group if self.kv_loop else 1

    @property
    def any_masked(self) -> bool:
        sh = self.shape
        return sh.causal or self.has_lengths or sh.kv_len % sh.block_size != 0

    def compiler_params(self):
        return plgpu.CompilerParams(
            approx_math=True, **({} if self.auto_barriers else {"unsafe_no_auto_barriers": True})
        )


def tuned_bwd_plan(shape: AttentionShape, mask_heads: int, has_lengths: bool) -> BwdPlan:
    """The backward launch used by the dispatch (docs/kernel_notes.md, ninth session): two dq warpgroups where
    two query heads share a row list, the dk/dv CTA walking the whole GQA group, no automatic barriers."""
    share = shape.q_heads // mask_heads
    return BwdPlan(shape, mask_heads, has_lengths, dq_consumers=2 if share % 2 == 0 else 1, kv_loop=True,
                   auto_barriers=False)


def _transforms():
    return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _vector(ref, interpreted: bool, axis: int):
    """A 64-float vector from shared memory in the layout that broadcasts along `1 - axis` of a wgmma tile."""
    if interpreted:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - axis))


# --------------------------------------------------------------------------------------------------
# dq
# --------------------------------------------------------------------------------------------------


def _dq_body(lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, scoped,
             *, plan: BwdPlan, interpreted: bool):
    sh = plan.shape
    bs, d, stages, consumers = sh.block_size, sh.head_dim, plan.stages, plan.dq_consumers
    dtype = q_ref.dtype
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem), (tile_ready, k_ready, v_ready), (k_free, v_free) = scoped
    cast, iota = layout_helpers(interpreted)

    qblk = sh.nq - 1 - lax.axis_index("q")
    first_head = lax.axis_index("h") * consumers  # the CTA's query heads: first_head + compute warpgroup
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    mhead = lax.div(first_head, jnp.int32(plan.share)) if plan.share > 1 else first_head
    kv_head = lax.div(first_head, jnp.int32(sh.group)) if sh.group > 1 else first_head
    count = spans_ref[b, mhead, qblk, 2]
    n_full = spans_ref[b, mhead, qblk, 1]  # row lists: [0, hi) full, [hi, count) masked
    row0 = qblk * bs

    @pl.when(wg < consumers)
    def _compute():
        if consumers == 2:
            plgpu.set_max_registers(232, action="increase")
        head = first_head + wg
        q_t, do_t, lse_t, delta_t = (ref.at[wg] for ref in (q_smem, do_smem, lse_smem, delta_smem))
        ready = [tile_ready.at[wg * 4 + i] for i in range(4)]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), head], q_t, ready[0])
        plgpu.copy_gmem_to_smem(do_ref.at[b, pl.ds(row0, ROWS), head], do_t, ready[1])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, head, pl.ds(row0, ROWS)], lse_t, ready[2])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(row0, ROWS)], delta_t, ready[3])
        for barrier in ready:
            plgpu.barrier_wait(barrier)
        lse = _vector(lse_t, interpreted, 0)
        delta = _vector(delta_t, interpreted, 0)
        valid = valid_ref[b]
        scale2 = jnp.float32(sh.sm_scale * LOG2_E)
        offset = sh.kv_len - sh.q_len

        def step(it, dq, masked: bool):
            slot = lax.rem(it, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])
            s = dot_nt(q_t, k_smem.at[slot], interpreted)
            plgpu.barrier_wait(v_ready.at[slot])
            dp = dot_nt(do_t, v_smem.at[slot], interpreted)
            plgpu.barrier_arrive(v_free.at[slot])
            if masked:
                start = lists_ref[b, mhead, qblk, it] * bs
                rows = iota((ROWS, bs), 0) + row0
                cols = iota((ROWS, bs), 1) + start
                vis = visible(rows, cols, valid, offset, causal=sh.causal, has_lengths=plan.has_lengths)
                s = jnp.where(vis, s, -jnp.inf)
            p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, s.shape, [0]))  # lse = +inf: p = 0
            ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
            dq = acc_dot(dq, ds.astype(dtype), k_smem.at[slot], interpreted)
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = cast(jnp.full((ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA)
        if plan.any_masked:
            dq = lax.fori_loop(0, n_full, lambda i, c: step(i, c, False), dq)
            dq = lax.fori_loop(n_full, count, lambda i, c: step(i, c, True), dq)
        else:
            dq = lax.fori_loop(0, count, lambda i, c: step(i, c, False), dq)
        q_t[...] = (dq * jnp.float32(sh.sm_scale)).astype(dtype)  # every wgmma reading Q was waited for
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_t, dq_ref.at[b, pl.ds(row0, ROWS), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _produce():
        if consumers == 2:
            plgpu.set_max_registers(40, action="decrease")
        ring_producer(count, stages, lambda it: lists_ref[b, mhead, qblk, it], kv_streams(
            k_ref, v_ref, b, kv_head, bs, (k_smem, k_ready, k_free), (v_smem, v_ready, v_free)))


def _dq_call(plan: BwdPlan, lists, spans, valid, q, k, v, do, lse_t, delta_t, interpret=None):
    sh = plan.shape
    d, bs, stages, dtype, consumers = sh.head_dim, sh.block_size, plan.stages, q.dtype, plan.dq_consumers
    tr = _transforms()

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: _dq_body(*refs, scoped, plan=plan, interpreted=interpret is not None),
            (
                plgpu.SMEM((consumers, ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((consumers, ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((consumers, ROWS), jnp.float32),
                plgpu.SMEM((consumers, ROWS), jnp.float32),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
            ),
            (plgpu.Barrier(num_barriers=4 * consumers), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
             plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)),
            collective_axes="wg",
        )

    kernel = _kernel_call(
        entry, jax.ShapeDtypeStruct(q.shape, dtype), grid=(sh.nq, sh.q_heads // consumers, sh.batch),
        grid_names=("q", "h", "b"), num_threads=consumers + 1, thread_name="wg",
        compiler_params=plan.compiler_params(), **({} if interpret is None else {"interpret": interpret}),
    )
    return kernel(lists, spans, valid, q, k, v, do, lse_t, delta_t)


# --------------------------------------------------------------------------------------------------
# dk, dv
# --------------------------------------------------------------------------------------------------


def _dkdv_body(tlists_ref, tspans_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
               scoped, *, plan: BwdPlan, interpreted: bool):
    sh = plan.shape
    bs, d, stages, n_heads = sh.block_size, sh.head_dim, plan.stages, plan.dkdv_heads
    dtype = q_ref.dtype
    (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring), ready, (q_free, do_free) = scoped
    kv_ready, q_ready, lse_ready, delta_ready, do_ready = ready  # one barrier per TMA copy in flight
    cast, iota = layout_helpers(interpreted)

    kblk = lax.axis_index("k")
    out_head = lax.axis_index("h")  # the KV head (kv_loop) or the query head whose gradients this CTA writes
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    first_head = out_head * n_heads
    kv_head = lax.div(first_head, jnp.int32(sh.group)) if sh.group > 1 else first_head
    key0 = kblk * bs

    def head_at(j):
        """Query head j of the CTA's walk, its mask head and its transposed list's (lo, hi, count)."""
        head = first_head + j
        mhead = lax.div(head, jnp.int32(plan.share)) if plan.share > 1 else head
        return head, mhead, [tspans_ref[b, mhead, kblk, i] for i in range(3)]

    @pl.when(wg == 0)
    def _compute():
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(key0, ROWS), kv_head], k_smem, kv_ready.at[0])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key0, ROWS), kv_head], v_smem, kv_ready.at[1])
        plgpu.barrier_wait(kv_ready.at[0])
        plgpu.barrier_wait(kv_ready.at[1])
        valid = valid_ref[b]
        scale2 = jnp.float32(sh.sm_scale * LOG2_E)
        offset = sh.kv_len - sh.q_len

        def head_pass(j, carry):
            dk, dv, gbase = carry  # gbase: ring steps taken by the heads before this one
            _, mhead, (lo, hi, count) = head_at(j)

            def step(it, carry, masked: bool):
                dk, dv = carry
                slot = lax.rem(gbase + it, jnp.int32(stages))
                plgpu.barrier_wait(q_ready.at[slot])
                s_t = dot_nt(k_smem, q_ring.at[slot], interpreted)  # [keys, query rows]
                if masked:
                    start = tlists_ref[b, mhead, kblk, it] * bs
                    keys = iota((ROWS, bs), 0) + key0
                    rows = iota((ROWS, bs), 1) + start
                    vis = visible(rows, keys, valid, offset, causal=sh.causal, has_lengths=plan.has_lengths)
                    s_t = jnp.where(vis, s_t, -jnp.inf)
                plgpu.barrier_wait(lse_ready.at[slot])
                lse = _vector(lse_ring.at[slot], interpreted, 1)
                p_t = jnp.exp2(s_t * scale2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))
                plgpu.barrier_wait(do_ready.at[slot])
                dv = acc_dot(dv, p_t.astype(dtype), do_ring.at[slot], interpreted)
                dp_t = dot_nt(v_smem, do_ring.at[slot], interpreted)
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_wait(delta_ready.at[slot])
                delta = _vector(delta_ring.at[slot], interpreted, 1)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))
                dk = acc_dot(dk, ds_t.astype(dtype), q_ring.at[slot], interpreted)
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            carry = (dk, dv)
            if plan.any_masked:
                carry = lax.fori_loop(0, lo, lambda i, c: step(i, c, True), carry)
                carry = lax.fori_loop(lo, hi, lambda i, c: step(i, c, False), carry)
                carry = lax.fori_loop(hi, count, lambda i, c: step(i, c, True), carry)
            else:
                carry = lax.fori_loop(0, count, lambda i, c: step(i, c, False), carry)
            return (*carry, gbase + count)

        zeros = cast(jnp.full((ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA)
        carry = (zeros, zeros, jnp.int32(0))
        if n_heads == 1:
            carry = head_pass(0, carry)
        else:
            carry = lax.fori_loop(0, n_heads, head_pass, carry)
        dk, dv, _ = carry
        # K and V are no longer read (every wgmma was waited for): their buffers take the gradients.
        k_smem[...] = (dk * jnp.float32(sh.sm_scale)).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, pl.ds(key0, ROWS), out_head])
        plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, pl.ds(key0, ROWS), out_head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _produce():
        def rows(blk):
            return pl.ds(blk * bs, bs)

        def produce_head(j, gbase):
            head, mhead, (_, _, count) = head_at(j)
            # Q, its LSE and delta share one release (all read before dK), dO has its own.
            q_stream = (q_free, [
                (lambda blk: q_ref.at[b, rows(blk), head], q_ring, q_ready),
                (lambda blk: lse_ref.at[b, head, rows(blk)], lse_ring, lse_ready),
                (lambda blk: delta_ref.at[b, head, rows(blk)], delta_ring, delta_ready),
            ])
            do_stream = (do_free, [(lambda blk: do_ref.at[b, rows(blk), head], do_ring, do_ready)])
            ring_producer(count, stages, lambda it: tlists_ref[b, mhead, kblk, it], [q_stream, do_stream],
                          base=gbase, drain=False)
            return gbase + count

        if n_heads == 1:
            total = produce_head(0, jnp.int32(0))
        else:
            total = lax.fori_loop(0, n_heads, produce_head, jnp.int32(0))
        ring_drain(total, stages, (q_free, do_free))


def _dkdv_call(plan: BwdPlan, tlists, tspans, valid, q, k, v, do, lse_t, delta_t, interpret=None):
    sh = plan.shape
    d, bs, stages, dtype = sh.head_dim, sh.block_size, plan.stages, q.dtype
    tr = _transforms()
    b, s_pad = k.shape[0], k.shape[1]
    out_heads = sh.q_heads // plan.dkdv_heads

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: _dkdv_body(*refs, scoped, plan=plan, interpreted=interpret is not None),
            (
                plgpu.SMEM((ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tr),
                plgpu.SMEM((stages, bs), jnp.float32),
                plgpu.SMEM((stages, bs), jnp.float32),
            ),
            (plgpu.Barrier(num_barriers=2),) + tuple(plgpu.Barrier(num_barriers=stages) for _ in range(4)),
            (plgpu.Barrier(num_arrivals=1, num_barriers=stages), plgpu.Barrier(num_arrivals=1, num_barriers=stages)),
            collective_axes="wg",
        )

    out = jax.ShapeDtypeStruct((b, s_pad, out_heads, d), dtype)
    kernel = _kernel_call(
        entry, (out, out), grid=(sh.nk, out_heads, sh.batch), grid_names=("k", "h", "b"),
        num_threads=2, thread_name="wg", compiler_params=plan.compiler_params(),
        **({} if interpret is None else {"interpret": interpret}),
    )
    dk, dv = kernel(tlists, tspans, valid, q, k, v, do, lse_t, delta_t)
    if out_heads == sh.kv_heads:
        return dk, dv

    def by_kv_head(x):  # the G query heads' partials of each KV head, summed in float32
        return x.reshape(b, s_pad, sh.kv_heads, sh.group, d).astype(jnp.float32).sum(axis=3).astype(dtype)

    return by_kv_head(dk), by_kv_head(dv)


# --------------------------------------------------------------------------------------------------
# Entry
# --------------------------------------------------------------------------------------------------


def from_portable_residuals(residuals):
    """The portable forward's residuals (`block_sparse._forward`: lse `[B, Tp, Hq]`) in the layout
    :func:`backward_hopper` takes (lse `[B, Hq, Tp]`, what the Hopper forward writes)."""
    q_p, k_p, v_p, out_p, lse, *rest = residuals
    return (q_p, k_p, v_p, out_p, jnp.swapaxes(lse, 1, 2), *rest)


def backward_hopper(plan: BwdPlan, residuals, d_out, *, interpret=None):
    """(dq, dk, dv): the same values as `block_sparse._backward`.

    `residuals`: `(q_p, k_p, v_p, out_p, lse, lists, spans, valid, visible, full)` — padded inputs and output, the
    base-2 log-sum-exp of the scaled logits `[B, Hq, Tp]` (+inf on rows that see no key), the row lists and
    their spans, valid lengths and the block tables (see `block_sparse._forward`; the Hopper forward saves them
    in this layout, :func:`from_portable_residuals` converts the portable forward's).
    """
    from seerjax.kernels.block_sparse import _pad_seq, compact_block_lists

    sh = plan.shape
    q_p, k_p, v_p, out_p, lse_t, lists, spans, valid, visible, full = residuals
    do_p = _pad_seq(d_out.astype(q_p.dtype), q_p.shape[1])
    # [B, Hq, Tp]: each head's rows contiguous, one TMA copy per tile.
    delta_t = jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), out_p.astype(jnp.float32))
    dq = _dq_call(plan, lists, spans, valid, q_p, k_p, v_p, do_p, lse_t, delta_t, interpret)
    lists_impl = "xla" if interpret is not None else None
    tlists, tspans = compact_block_lists(
        jnp.swapaxes(visible, 2, 3), jnp.swapaxes(full, 2, 3), implementation=lists_impl
    )
    dk, dv = _dkdv_call(plan, tlists, tspans, valid, q_p, k_p, v_p, do_p, lse_t, delta_t, interpret)
    return dq[:, : sh.q_len], dk[:, : sh.kv_len], dv[:, : sh.kv_len]
