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
    _kernel_call, acc_dot, dot_nt, kv_streams, layout_helpers, plgpu, ring_producer, visible,
)

LOG2_E = math.log2(math.e)
SMEM_LIMIT = 232448  # bytes of shared memory one CTA may use on an H100/H200 (227 KiB)
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
      dkdv_consumers: dk/dv compute warpgroups per CTA (1 or 2), each with its own key block (adjacent blocks),
        K/V tile and ring of Q/dO tiles; one producer fills both rings, a step of each in turn. Two give the SM
        two compute warpgroups whose softmax and matmuls interleave (and the register split of a producer).
      fused_delta: the dq kernel computes `delta = rowsum(dO · O)` from its dO tile and the output's (one more
        tile load) and writes it for the dk/dv kernel, instead of a separate XLA pass over dO and O.
      overlap: issue the two products that read only shared memory (S = Q Kᵀ and dP = dO Vᵀ; in dk/dv Sᵀ and dPᵀ)
        back to back and compute P from S while dP's wgmma runs; in dk/dv also issue dV += Pᵀ dO before computing
        dSᵀ, which then runs under it, and wait once for both gradient products. Without it each wgmma is waited
        for before the next step of the warpgroup's work.
      auto_barriers: Pallas' warpgroup barrier around every shared-memory store (its default). Neither kernel
        needs one: their only shared-memory stores are the final gradient tiles, written after every wgmma
        that read the buffer was waited for, and (`fused_delta`) the delta tile, written once; each is followed
        by `commit_smem` before its TMA store.
    """

    shape: AttentionShape
    mask_heads: int
    has_lengths: bool
    stages: int = 2
    dq_consumers: int = 1
    kv_loop: bool = False
    auto_barriers: bool = True
    overlap: bool = False
    dkdv_consumers: int = 1
    fused_delta: bool = False

    def __post_init__(self):
        if self.stages < 2:
            raise ValueError(f"stages must be >= 2, got {self.stages}")
        if self.dkdv_consumers not in (1, 2):
            raise ValueError(f"dkdv_consumers must be 1 or 2, got {self.dkdv_consumers}")
        if self.dq_consumers not in (1, 2) or self.share % self.dq_consumers:
            raise ValueError(
                f"dq_consumers must be 1 or 2 and divide the {self.share} query heads per mask head, "
                f"got {self.dq_consumers}"
            )
        dq, dkdv = self.smem_bytes()
        if max(dq, dkdv) > SMEM_LIMIT:
            raise ValueError(
                f"stages={self.stages} with dq_consumers={self.dq_consumers}, dkdv_consumers={self.dkdv_consumers}, "
                f"fused_delta={self.fused_delta} at head_dim {self.shape.head_dim} needs {dq} / {dkdv} bytes of "
                f"shared memory per dq / dk-dv CTA; an H100 has {SMEM_LIMIT}: use fewer stages or consumers"
            )

    def smem_bytes(self) -> tuple[int, int]:
        """Shared memory of a dq CTA and of a dk/dv CTA (16-bit tiles; barriers ignored)."""
        tile = ROWS * self.shape.head_dim * 2
        c, k = self.dq_consumers, self.dkdv_consumers
        dq = c * (3 if self.fused_delta else 2) * tile + 2 * self.stages * tile + 2 * c * ROWS * 4
        dkdv = k * (2 * tile + self.stages * (2 * tile + 2 * ROWS * 4))
        return dq, dkdv

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
    two query heads share a row list, two dk/dv warpgroups per CTA walking the whole GQA group, overlapped
    products, delta computed in the dq kernel, no automatic barriers, 2 stages (what fits two dk/dv rings)."""
    share = shape.q_heads // mask_heads
    return BwdPlan(shape, mask_heads, has_lengths, stages=2, dq_consumers=2 if share % 2 == 0 else 1, kv_loop=True,
                   auto_barriers=False, overlap=True, dkdv_consumers=2, fused_delta=True)


def _mask_tile(s, iota, q_axis: int, q0, k0, valid, offset, plan: BwdPlan):
    """`s` with -inf where the (query row, key) pair does not attend: query rows along `q_axis` from `q0`, keys along
    the other axis from `k0`."""
    rows = iota(s.shape, q_axis) + q0
    keys = iota(s.shape, 1 - q_axis) + k0
    vis = visible(rows, keys, valid, offset, causal=plan.shape.causal, has_lengths=plan.has_lengths)
    return jnp.where(vis, s, -jnp.inf)


def _products_nt(a1, b1, a2, b2, interpreted: bool, on_first):
    """(on_first(a1·b1ᵀ), a2·b2ᵀ) in float32, all four operands in shared memory: both wgmmas are issued back to
    back and `on_first` runs on the first product while the second one computes."""
    if interpreted:
        x1 = dot_nt(a1, b1, True)
        return on_first(x1), dot_nt(a2, b2, True)

    def body(acc1, acc2):
        plgpu.wgmma(acc1, a1, plgpu.transpose_ref(b1, (1, 0)))
        plgpu.wgmma(acc2, a2, plgpu.transpose_ref(b2, (1, 0)))
        y = on_first(plgpu.wgmma_accumulator_load(acc1, wait_n=1))
        return y, plgpu.wgmma_accumulator_load(acc2, wait_n=0)

    return pl.run_scoped(body, plgpu.ACC((a1.shape[0], b1.shape[0]), jnp.float32),
                         plgpu.ACC((a2.shape[0], b2.shape[0]), jnp.float32))


def _acc_products(acc1, x1, b1, acc2, make_x2, b2, interpreted: bool):
    """(acc1 + x1·b1, acc2 + make_x2()·b2): x registers, b shared memory; `make_x2` runs while the first wgmma
    computes, and both are waited for once at the end."""
    if interpreted:
        acc1 = acc_dot(acc1, x1, b1, True)
        return acc1, acc_dot(acc2, make_x2(), b2, True)

    def body(refs):
        r1, r2 = refs
        plgpu.wgmma(r1, x1, b1)
        plgpu.wgmma(r2, make_x2(), b2)

    return pl.run_state(body)((plgpu.ACC.init(acc1), plgpu.ACC.init(acc2)))


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


def _dq_body(lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *rest,
             plan: BwdPlan, interpreted: bool):
    """With `fused_delta`, `delta_ref` is the forward's output O and `rest` starts with the delta output."""
    *delta_out, scoped = rest
    sh = plan.shape
    bs, d, stages, consumers = sh.block_size, sh.head_dim, plan.stages, plan.dq_consumers
    dtype = q_ref.dtype
    (q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem, *o_smem), (tile_ready, k_ready, v_ready), (
        k_free, v_free) = scoped
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
        if plan.fused_delta:  # delta = rowsum(dO · O) from the dO tile and the output's tile
            o_t = o_smem[0].at[wg]
            plgpu.copy_gmem_to_smem(delta_ref.at[b, pl.ds(row0, ROWS), head], o_t, ready[3])
        else:
            plgpu.copy_gmem_to_smem(delta_ref.at[b, head, pl.ds(row0, ROWS)], delta_t, ready[3])
        for barrier in ready:
            plgpu.barrier_wait(barrier)
        lse = _vector(lse_t, interpreted, 0)
        if plan.fused_delta:
            if interpreted:
                do_x, o_x = do_t[...], o_t[...]
            else:
                do_x, o_x = (plgpu.load(x, (), layout=plgpu.Layout.WGMMA) for x in (do_t, o_t))
            delta = (do_x.astype(jnp.float32) * o_x.astype(jnp.float32)).sum(axis=1)
            delta_t[...] = delta  # for the dk/dv kernel
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(delta_t, delta_out[0].at[b, head, pl.ds(row0, ROWS)])
        else:
            delta = _vector(delta_t, interpreted, 0)
        valid = valid_ref[b]
        scale2 = jnp.float32(sh.sm_scale * LOG2_E)
        offset = sh.kv_len - sh.q_len

        def step(it, dq, masked: bool):
            slot = lax.rem(it, jnp.int32(stages))

            def probabilities(s):
                if masked:
                    s = _mask_tile(s, iota, 0, row0, lists_ref[b, mhead, qblk, it] * bs, valid, offset, plan)
                return jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse, s.shape, [0]))  # lse = +inf: p = 0

            plgpu.barrier_wait(k_ready.at[slot])
            if plan.overlap:
                plgpu.barrier_wait(v_ready.at[slot])
                p, dp = _products_nt(q_t, k_smem.at[slot], do_t, v_smem.at[slot], interpreted, probabilities)
            else:
                s = dot_nt(q_t, k_smem.at[slot], interpreted)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = dot_nt(do_t, v_smem.at[slot], interpreted)
                p = probabilities(s)
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))
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
    """dq; with `fused_delta` `delta_t` is the padded output O `[B, Tp, Hq, D]` and the result `(dq, delta)`."""
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
                *([plgpu.SMEM((consumers, ROWS, d), dtype, transforms=tr)] if plan.fused_delta else []),
            ),
            (plgpu.Barrier(num_barriers=4 * consumers), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
             plgpu.Barrier(num_arrivals=consumers, num_barriers=stages)),
            collective_axes="wg",
        )

    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    if plan.fused_delta:
        out_type = (out_type, jax.ShapeDtypeStruct((q.shape[0], sh.q_heads, q.shape[1]), jnp.float32))
    kernel = _kernel_call(
        entry, out_type, grid=(sh.nq, sh.q_heads // consumers, sh.batch),
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
    bs, d, stages, n_heads, consumers = sh.block_size, sh.head_dim, plan.stages, plan.dkdv_heads, plan.dkdv_consumers
    dtype = q_ref.dtype
    (k_smem, v_smem, q_ring, do_ring, lse_ring, delta_ring), ready, (q_free, do_free) = scoped
    kv_ready, q_ready, lse_ready, delta_ready, do_ready = ready  # one barrier per TMA copy in flight
    cast, iota = layout_helpers(interpreted)

    first_kblk = lax.axis_index("k") * consumers  # compute warpgroup c owns key block first_kblk + c
    out_head = lax.axis_index("h")  # the KV head (kv_loop) or the query head whose gradients this CTA writes
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    first_head = out_head * n_heads
    kv_head = lax.div(first_head, jnp.int32(sh.group)) if sh.group > 1 else first_head

    def head_at(j, kblk):
        """Query head j of the CTA's walk, its mask head, and its transposed list's (lo, hi, count) at `kblk`
        (count 0 past the last key block, where an odd key-block count leaves the last CTA's second warpgroup)."""
        head = first_head + j
        mhead = lax.div(head, jnp.int32(plan.share)) if plan.share > 1 else head
        spans = [tspans_ref[b, mhead, lax.min(kblk, sh.nk - 1), i] for i in range(3)]
        if consumers > 1 and sh.nk % consumers:
            spans[2] = jnp.where(kblk < sh.nk, spans[2], 0)
        return head, mhead, spans

    def ring(ref, c):  # consumer c's slots
        return ref.at[c] if consumers > 1 else ref

    def bar(barrier, c, slot):
        return barrier.at[c * stages + slot] if consumers > 1 else barrier.at[slot]

    @pl.when(wg < consumers)
    def _compute():
        if consumers == 2:
            plgpu.set_max_registers(232, action="increase")
        c = wg
        kblk = first_kblk + c
        key0 = kblk * bs
        k_t, v_t = ring(k_smem, c), ring(v_smem, c)
        q_c, do_c, lse_c, delta_c = (ring(x, c) for x in (q_ring, do_ring, lse_ring, delta_ring))

        @pl.when(kblk < sh.nk)
        def _():
            plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(key0, ROWS), kv_head], k_t, kv_ready.at[2 * c])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(key0, ROWS), kv_head], v_t, kv_ready.at[2 * c + 1])
            plgpu.barrier_wait(kv_ready.at[2 * c])
            plgpu.barrier_wait(kv_ready.at[2 * c + 1])

        valid = valid_ref[b]
        scale2 = jnp.float32(sh.sm_scale * LOG2_E)
        offset = sh.kv_len - sh.q_len

        def head_pass(j, carry):
            dk, dv, gbase = carry  # gbase: ring steps taken by the heads before this one
            _, mhead, (lo, hi, count) = head_at(j, kblk)

            def step(it, carry, masked: bool):
                dk, dv = carry
                slot = lax.rem(gbase + it, jnp.int32(stages))

                def probabilities(s_t):  # [keys, query rows]
                    if masked:
                        s_t = _mask_tile(s_t, iota, 1, tlists_ref[b, mhead, kblk, it] * bs, key0, valid, offset, plan)
                    plgpu.barrier_wait(bar(lse_ready, c, slot))
                    lse = _vector(lse_c.at[slot], interpreted, 1)
                    return jnp.exp2(s_t * scale2 - lax.broadcast_in_dim(lse, s_t.shape, [1]))

                q_s, do_s = q_c.at[slot], do_c.at[slot]
                plgpu.barrier_wait(bar(q_ready, c, slot))
                if plan.overlap:
                    plgpu.barrier_wait(bar(do_ready, c, slot))
                    p_t, dp_t = _products_nt(k_t, q_s, v_t, do_s, interpreted, probabilities)
                    plgpu.barrier_wait(bar(delta_ready, c, slot))
                    delta = _vector(delta_c.at[slot], interpreted, 1)
                    dv, dk = _acc_products(
                        dv, p_t.astype(dtype), do_s, dk,
                        lambda: (p_t * (dp_t - lax.broadcast_in_dim(delta, p_t.shape, [1]))).astype(dtype),
                        q_s, interpreted)
                    plgpu.barrier_arrive(bar(do_free, c, slot))
                    plgpu.barrier_arrive(bar(q_free, c, slot))
                    return dk, dv
                p_t = probabilities(dot_nt(k_t, q_s, interpreted))
                plgpu.barrier_wait(bar(do_ready, c, slot))
                dv = acc_dot(dv, p_t.astype(dtype), do_s, interpreted)
                dp_t = dot_nt(v_t, do_s, interpreted)
                plgpu.barrier_arrive(bar(do_free, c, slot))
                plgpu.barrier_wait(bar(delta_ready, c, slot))
                delta = _vector(delta_c.at[slot], interpreted, 1)
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, p_t.shape, [1]))
                dk = acc_dot(dk, ds_t.astype(dtype), q_s, interpreted)
                plgpu.barrier_arrive(bar(q_free, c, slot))
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

        @pl.when(kblk < sh.nk)
        def _():
            # K and V are no longer read (every wgmma was waited for): their buffers take the gradients.
            k_t[...] = (dk * jnp.float32(sh.sm_scale)).astype(dtype)
            v_t[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_t, dk_ref.at[b, pl.ds(key0, ROWS), out_head])
            plgpu.copy_smem_to_gmem(v_t, dv_ref.at[b, pl.ds(key0, ROWS), out_head])
            plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == consumers)
    def _produce():
        if consumers == 2:
            plgpu.set_max_registers(40, action="decrease")

        def rows(blk):
            return pl.ds(blk * bs, bs)

        def produce_head(j, gbases):
            """Every consumer's blocks of head j, one step of each in turn (their rings fill side by side)."""
            heads = [head_at(j, first_kblk + c) for c in range(consumers)]
            counts = [spans[2] for _, _, spans in heads]
            longest = counts[0] if consumers == 1 else jnp.maximum(*counts)

            @pl.loop(0, longest)
            def _fetch(it):
                for c, (head, mhead, _) in enumerate(heads):
                    g = gbases[c] + it
                    slot = lax.rem(g, jnp.int32(stages))

                    @pl.when(it < counts[c])
                    def _(c=c, head=head, mhead=mhead, g=g, slot=slot):
                        blk = tlists_ref[b, mhead, first_kblk + c, it]
                        # Q, its LSE and delta share one release (all read before dK), dO has its own.
                        for free, copies in (
                            (q_free, ((q_ref.at[b, rows(blk), head], q_ring, q_ready),
                                      (lse_ref.at[b, head, rows(blk)], lse_ring, lse_ready),
                                      (delta_ref.at[b, head, rows(blk)], delta_ring, delta_ready))),
                            (do_free, ((do_ref.at[b, rows(blk), head], do_ring, do_ready),)),
                        ):
                            @pl.when(g >= stages)
                            def _(free=free):
                                plgpu.barrier_wait(bar(free, c, slot))

                            for src, dst, ready_bar in copies:
                                plgpu.copy_gmem_to_smem(src, ring(dst, c).at[slot], bar(ready_bar, c, slot))

            return tuple(g + n for g, n in zip(gbases, counts))

        start = tuple(jnp.int32(0) for _ in range(consumers))
        totals = produce_head(0, start) if n_heads == 1 else lax.fori_loop(0, n_heads, produce_head, start)
        for c, total in enumerate(totals):
            # the consumers' releases of the last steps, so every barrier phase is waited on before the end
            @pl.loop(jnp.maximum(total - stages, 0), total)
            def _drain(g, c=c):
                slot = lax.rem(g, jnp.int32(stages))
                plgpu.barrier_wait(bar(q_free, c, slot))
                plgpu.barrier_wait(bar(do_free, c, slot))


def _dkdv_call(plan: BwdPlan, tlists, tspans, valid, q, k, v, do, lse_t, delta_t, interpret=None):
    sh = plan.shape
    d, bs, stages, dtype, consumers = sh.head_dim, sh.block_size, plan.stages, q.dtype, plan.dkdv_consumers
    tr = _transforms()
    b, s_pad = k.shape[0], k.shape[1]
    out_heads = sh.q_heads // plan.dkdv_heads
    lead = (consumers,) if consumers > 1 else ()

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: _dkdv_body(*refs, scoped, plan=plan, interpreted=interpret is not None),
            (
                plgpu.SMEM((*lead, ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((*lead, ROWS, d), dtype, transforms=tr),
                plgpu.SMEM((*lead, stages, bs, d), dtype, transforms=tr),
                plgpu.SMEM((*lead, stages, bs, d), dtype, transforms=tr),
                plgpu.SMEM((*lead, stages, bs), jnp.float32),
                plgpu.SMEM((*lead, stages, bs), jnp.float32),
            ),
            (plgpu.Barrier(num_barriers=2 * consumers),)
            + tuple(plgpu.Barrier(num_barriers=consumers * stages) for _ in range(4)),
            (plgpu.Barrier(num_arrivals=1, num_barriers=consumers * stages),
             plgpu.Barrier(num_arrivals=1, num_barriers=consumers * stages)),
            collective_axes="wg",
        )

    out = jax.ShapeDtypeStruct((b, s_pad, out_heads, d), dtype)
    kernel = _kernel_call(
        entry, (out, out), grid=(-(-sh.nk // consumers), out_heads, sh.batch), grid_names=("k", "h", "b"),
        num_threads=consumers + 1, thread_name="wg", compiler_params=plan.compiler_params(),
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
    if plan.fused_delta:  # the dq kernel computes delta from its dO tile and writes it for dk/dv
        dq, delta_t = _dq_call(plan, lists, spans, valid, q_p, k_p, v_p, do_p, lse_t, out_p, interpret)
    else:
        # [B, Hq, Tp]: each head's rows contiguous, one TMA copy per tile.
        delta_t = jnp.einsum("bthd,bthd->bht", do_p.astype(jnp.float32), out_p.astype(jnp.float32))
        dq = _dq_call(plan, lists, spans, valid, q_p, k_p, v_p, do_p, lse_t, delta_t, interpret)
    lists_impl = "xla" if interpret is not None else None
    tlists, tspans = compact_block_lists(
        jnp.swapaxes(visible, 2, 3), jnp.swapaxes(full, 2, 3), implementation=lists_impl
    )
    dk, dv = _dkdv_call(plan, tlists, tspans, valid, q_p, k_p, v_p, do_p, lse_t, delta_t, interpret)
    return dq[:, : sh.q_len], dk[:, : sh.kv_len], dv[:, : sh.kv_len]
