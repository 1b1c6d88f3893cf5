"""Block-sparse flash attention forward for Hopper (sm_90) in Pallas Mosaic GPU.

Semantics are those of :func:`seerjax.kernels.reference.block_sparse_attention_reference`; the calling
convention is that of :func:`seerjax.kernels.block_sparse.block_sparse_attention_pallas`. The kernel is a
forward (optionally writing the log-sum-exp); the dispatch entry :func:`block_sparse_attention_sm90` makes it
differentiable through the Mosaic GPU backward (:mod:`seerjax.kernels.hopper_bwd`) at block 64 and the portable
one elsewhere.

How the work is laid out (FlashAttention-3-like, warp specialized):

* Outside the kernel (jnp, inside jit) the block mask becomes the same compact per-row lists as the
  portable kernel (`block_tables` + `compact_block_lists` from :mod:`seerjax.kernels.block_sparse`): for
  each (batch, mask head, query block) the visible selected key blocks in increasing order, and
  `(lo, hi, count)`. For row lists `lo == 0`: entries `[0, hi)` need no element mask, `[hi, count)` do
  (the causal diagonal, the partial last key block, a query block cut by `lengths`).
* A CTA has `consumers` compute warpgroups plus one producer warpgroup. Every compute warpgroup owns a
  64-row query tile (one wgmma M tile) of one query head; all tiles of a CTA share one list row, so each
  K/V block that the producer fetches is used by all of them:
    - per-KV-head masks: two query heads of the GQA group (same query rows),
    - per-query-head masks with block 128: the two 64-row halves of the block,
    - per-query-head masks with block 64: one compute warpgroup (nothing else shares the list).
  With `tiles_per_wg=2` (a tuning option, slower than two one-tile warpgroups on the H100) each compute
  warpgroup owns two such tiles and runs both tiles' products on every K/V block it waits for, so 2 warpgroups
  serve all 4 query heads of a Llama GQA group from one K/V stream (half the shared-memory fill traffic).
* The producer walks the list (loop bound = the row's count), and issues TMA copies of K and V of the
  listed key block into a ring of `stages` shared-memory slots, each completing on an mbarrier; compute
  warpgroups release a slot through a "consumed" barrier.
* Compute: S = Q Kᵀ by wgmma (Q and K from shared memory), online softmax in float32 registers in base 2
  (`log2(e) * sm_scale` folded into one multiply), P cast to q's dtype, O += P V by wgmma (P from
  registers). The element mask is built only in the masked suffix of the list.
* Output through shared memory (the Q tile's buffer) and a TMA store. Rows with no visible key are zero.
* T and S that are not multiples of block_size are padded with zeros outside the kernel (then sliced).
* Schedule options (:class:`HopperPlan`; the dispatch's choice is :func:`tuned_launch`): two list entries per
  step (128-key S tiles), the next K waited for under P V, no automatic barriers, ping-pong between the two
  compute warpgroups (or, instead, intra-warpgroup overlap: the next S = Q Kᵀ and this P V in flight together),
  and a persistent grid (one CTA per SM walking work items, head-major, the next item's Q and K/V loading while
  the current one finishes).

API notes (jax 0.10.2 on CPU hosts, 0.11.x on the GPU machine): the subset of `plgpu` used here
(`kernel`, `SMEM`, `Barrier`, `copy_gmem_to_smem` with a barrier, `barrier_wait/arrive`, `wgmma`, `ACC`,
`transpose_ref`, `layout_cast`, `Layout.WGMMA(.reduce)`, `broadcasted_iota`, `commit_smem`,
`copy_smem_to_gmem`, `wait_smem_to_gmem`, `set_max_registers`, Tiling/Swizzle transforms) has the same
signatures in both. `plgpu.kernel(out_shape=...)` is a deprecated alias of `out_type=` in 0.10 and
missing `out_type` in older versions: :func:`_kernel_call` picks whichever the installed version takes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Mosaic GPU Pallas; absent from very old or trimmed jax builds.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - exercised only on jax builds without Mosaic GPU
    plgpu = None

from seerjax.kernels.block_sparse import _pad_seq, block_tables, compact_block_lists, valid_lengths
from seerjax.kernels.checks import AttentionShape

LOG2_E = math.log2(math.e)
WG_ROWS = 64  # query rows per compute warpgroup: one wgmma M tile

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)


def hopper_supported(shape: AttentionShape, mask_heads: int, dtype) -> bool:
    """Whether :func:`block_sparse_attention_hopper` handles this call (else use the portable kernel).

    Supported: bf16/fp16, head_dim 64 or 128, block_size 64 or 128, mask heads Hq or Hkv, Mosaic GPU
    importable. (Where the device is not a Hopper GPU, dispatch has to check that separately.)
    """
    if plgpu is None:
        return False
    if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
        return False
    if shape.head_dim not in SUPPORTED_HEAD_DIMS or shape.block_size not in SUPPORTED_BLOCK_SIZES:
        return False
    if mask_heads not in (shape.q_heads, shape.kv_heads):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class HopperPlan:
    """Static launch facts of one call.

    Attributes:
      shape: the call's AttentionShape.
      mask_heads: Hm (Hq or Hkv).
      has_lengths: right-padding lengths given.
      stages: K/V shared-memory ring depth (>= 2).
      consumers: compute warpgroups per CTA (1 or 2).
      tiles_per_wg: 64-row query tiles per compute warpgroup (1 or 2). With 2, a warpgroup runs both tiles'
        products on each K/V block it waits for (two accumulators in registers), so a CTA with 2 warpgroups
        serves all 4 query heads of a Llama GQA group from one K/V stream: half the K/V traffic into
        shared memory of 2 CTAs with 2 heads each.
      pingpong: FlashAttention-3's schedule between the two compute warpgroups (one's softmax runs while the
        other's matmuls hold the tensor cores), through one shared barrier; needs consumers == 2 and
        tiles_per_wg == 1. Both warpgroups walk the same list, so their steps pair up one to one.
      emit_stats: also write, per query row, its max base-2 scaled logit of every listed key block
        (`[B, Hq, nk, T_pad]` float32) and its base-2 log-sum-exp (`[B, Hq, T_pad]`, -inf when the row sees
        nothing): what the one-pass pooled map is made of (:func:`attention_with_pooling_hopper`).
      pair_blocks: each loop step takes two list entries: the producer fetches both key blocks into the two
        halves of one ring slot (two TMA copies on one barrier), and the compute warpgroups run S = Q Kᵀ on a
        64 × 2·block tile and one P V product over both (FlashAttention-3's 128-key tiles from a 64-block mask:
        half the barrier round trips and softmax reductions per FLOP). An odd count's last step fetches its
        block twice (one ring step, two copies on the barrier) and runs on the first copy alone: a 64-key
        step, not a padded pair. Block 64 only, one tile per warpgroup. With `emit_stats` each half's row
        maximum is reduced and stored separately (a static slice of the S tile per block).
      early_wait: wait for the next step's K while this step's P V wgmma runs (FlashAttention-3's order),
        instead of at the top of the next step.
      auto_barriers: let Pallas put a warpgroup barrier around every shared-memory store and before every TMA
        issue (its conservative default). The forward needs none of them: its shared-memory stores (the output
        tile; with `emit_stats` the row-max and LSE stages) are each followed by `commit_smem` (a fence and a
        warpgroup barrier) before their TMA store, a stage is rewritten only after `wait_smem_to_gmem` (which
        ends in a warpgroup barrier) saw its last store read it, and the ring's slots are guarded by the
        free/ready mbarriers.
      persistent: 0 (one CTA per work item: a list row's query block and CTA chunk), or the number of CTAs
        of a persistent grid (the GPU's SM count): each CTA walks items cta, cta + P, ... in the same long-rows-
        first order, its producer loading the next item's Q (two Q buffers) and K/V (the ring runs on across
        items) while the compute warpgroups finish the current one, so the per-CTA start, first loads and
        output store of short rows overlap the neighbours' compute. With `emit_stats` a row-max stage slot is
        rewritten only after the stores since its last use were waited for (`wait_smem_to_gmem`), which holds
        across items too: every item ends (or, with `late_release`, the next one starts) with all stores read.
      emit_lse: also write each query row's base-2 log-sum-exp of its scaled logits (`[B, Hq, T_pad]` float32,
        -inf on a row that sees nothing; implied by `emit_stats`): the residual of the Hopper backward
        (:mod:`seerjax.kernels.hopper_bwd`). Any launch, persistent included.
      late_release: persistent only: a compute warpgroup does not wait for its output store to read the Q buffer
        at the end of an item; it waits (by then long done) and releases the buffer during the next item's first
        step, or after its last item, so the store's latency overlaps the next item's work.
      head_major: persistent only: order the work items by (batch, mask head) first, so the CTAs that run
        together read one KV head's K and V (16 MB at 32k for Llama-3-8B: it fits the 50 MB L2, where all 8
        heads' do not).
      overlap: FlashAttention-3's intra-warpgroup overlap: each step issues S_i = Q K_iᵀ and O += P_{i-1} V_{i-1}
        back to back and runs the softmax of S_i while the second product computes; O is rescaled after it.
        One tile per warpgroup, without ping-pong or `emit_stats`; an odd count's last entry is a padded pair.
        P is converted to the input dtype only after P_{i-1} V_{i-1} is done: writing the bf16 P registers while
        that wgmma reads the previous ones made ptxas serialize every wgmma (C7513; 2.05–2.16 ms at 32k, density
        0.1, against 1.57–1.69 ms with the late conversion, tenth session).
      rowmax_batch: with `emit_stats`, the steps whose block row maxima go out in one TMA store (R): each compute
        warpgroup fills a stage of R steps' blocks and stores it whole (one fence, warpgroup barrier and TMA issue
        per R steps instead of one per block). Only for lists that are 0, 1, ..., count - 1 (the pooled forward's
        every-visible-block lists); the row-max buffer's block axis is padded to whole stages
        (:attr:`rowmax_blocks`), and the padding and the slots a row's last stage leaves unwritten hold blocks no
        row of it sees. 1: each block's maxima stored on their own (any lists).
    """

    shape: AttentionShape
    mask_heads: int
    has_lengths: bool
    stages: int
    consumers: int
    tiles_per_wg: int = 1
    pingpong: bool = False
    emit_stats: bool = False
    pair_blocks: bool = False
    early_wait: bool = False
    auto_barriers: bool = True
    persistent: int = 0
    head_major: bool = False
    emit_lse: bool = False
    late_release: bool = False
    overlap: bool = False
    rowmax_batch: int = 1

    @property
    def rowmax_blocks(self) -> int:
        """Key blocks of the row-max buffer: nk rounded up to whole stages of rowmax_batch steps."""
        per = self.rowmax_batch * self.per_step
        return -(-self.shape.nk // per) * per

    @property
    def writes_lse(self) -> bool:
        """Whether the kernel has the log-sum-exp output (`emit_lse`, or `emit_stats`, which includes it)."""
        return self.emit_stats or self.emit_lse

    @property
    def qbufs(self) -> int:
        """Q tile buffers: 2 in a persistent CTA (the next item's Q loads while this one runs), else 1."""
        return 2 if self.persistent else 1

    @property
    def per_step(self) -> int:
        """List entries (key blocks) per loop step: 2 with `pair_blocks`, else 1."""
        return 2 if self.pair_blocks else 1

    @property
    def share(self) -> int:
        """Query heads per mask head (G for per-KV-head masks, 1 for per-query-head masks)."""
        return self.shape.q_heads // self.mask_heads

    @property
    def subtiles(self) -> int:
        """64-row tiles per query block."""
        return self.shape.block_size // WG_ROWS

    @property
    def tiles_per_row(self) -> int:
        """64-row tiles that share one list row: heads sharing the mask head times sub-tiles."""
        return self.share * self.subtiles

    @property
    def ctas_per_row(self) -> int:
        return self.tiles_per_row // (self.consumers * self.tiles_per_wg)

    @property
    def tiles_per_cta(self) -> int:
        return self.consumers * self.tiles_per_wg

    @property
    def any_masked(self) -> bool:
        sh = self.shape
        return sh.causal or self.has_lengths or sh.kv_len % sh.block_size != 0


def make_hopper_plan(
    shape: AttentionShape, mask_heads: int, has_lengths: bool, *, stages: int | None = None,
    consumers: int | None = None, tiles_per_wg: int | None = None, pingpong: bool = False,
    emit_stats: bool = False, pair_blocks: bool = False, early_wait: bool = False, auto_barriers: bool | None = None,
    persistent: int = 0, head_major: bool = False, emit_lse: bool = False, late_release: bool = False,
    overlap: bool = False, rowmax_batch: int = 1,
) -> HopperPlan:
    tiles = (shape.q_heads // mask_heads) * (shape.block_size // WG_ROWS)
    if consumers is None:
        consumers = 2 if tiles % 2 == 0 else 1
    if consumers not in (1, 2) or tiles % consumers:
        raise ValueError(f"consumers must be 1 or 2 and divide the {tiles} tiles sharing a list, got {consumers}")
    if tiles_per_wg is None:
        tiles_per_wg = 1
    if tiles_per_wg not in (1, 2) or tiles % (consumers * tiles_per_wg):
        raise ValueError(
            f"tiles_per_wg must be 1 or 2, and consumers × tiles_per_wg must divide the {tiles} tiles sharing a "
            f"list; got tiles_per_wg={tiles_per_wg} with consumers={consumers}"
        )
    if stages is None:
        stages = 2
    if stages < 2:
        raise ValueError(f"stages must be >= 2, got {stages}")
    if pingpong and (consumers != 2 or tiles_per_wg != 1):
        raise ValueError(
            f"pingpong needs consumers=2 and tiles_per_wg=1, got consumers={consumers}, tiles_per_wg={tiles_per_wg}"
        )
    if emit_stats and tiles_per_wg != 1:
        raise ValueError(f"emit_stats needs tiles_per_wg=1, got {tiles_per_wg}")
    if pair_blocks and (shape.block_size != 64 or tiles_per_wg != 1):
        raise ValueError(
            f"pair_blocks needs block_size 64 and tiles_per_wg=1; got block_size {shape.block_size}, "
            f"tiles_per_wg={tiles_per_wg}"
        )
    if auto_barriers is None:
        auto_barriers = True
    if not isinstance(persistent, int) or persistent < 0:
        raise ValueError(f"persistent must be 0 or a CTA count >= 1; got {persistent!r}")
    if head_major and not persistent:
        raise ValueError("head_major orders a persistent grid's items: it needs persistent > 0")
    if late_release and not persistent:
        raise ValueError("late_release defers a persistent CTA's buffer release to its next item: it needs persistent > 0")
    if overlap and (tiles_per_wg != 1 or pingpong or emit_stats or early_wait):
        raise ValueError(
            "overlap needs tiles_per_wg=1 and no pingpong, emit_stats or early_wait (it orders each step's waits "
            f"itself); got tiles_per_wg={tiles_per_wg}, pingpong={pingpong}, emit_stats={emit_stats}, "
            f"early_wait={early_wait}"
        )
    if isinstance(rowmax_batch, bool) or not isinstance(rowmax_batch, int) or rowmax_batch < 1:
        raise ValueError(f"rowmax_batch must be an int >= 1 (steps per row-max store); got {rowmax_batch!r}")
    if rowmax_batch > 1 and not emit_stats:
        raise ValueError(f"rowmax_batch={rowmax_batch} batches the row-max stores of emit_stats, which is off")
    return HopperPlan(
        shape, mask_heads, has_lengths, stages, consumers, tiles_per_wg, bool(pingpong), bool(emit_stats),
        bool(pair_blocks), bool(early_wait), bool(auto_barriers), int(persistent), bool(head_major), bool(emit_lse),
        bool(late_release), bool(overlap), int(rowmax_batch),
    )


def smem_bytes(plan: HopperPlan, itemsize: int = 2) -> int:
    """Shared memory of one CTA: Q/O tiles plus the K and V rings (barriers ignored)."""
    d, bs = plan.shape.head_dim, plan.shape.block_size
    return itemsize * (plan.qbufs * plan.tiles_per_cta * WG_ROWS * d + 2 * plan.stages * plan.per_step * bs * d)


# --------------------------------------------------------------------------------------------------
# Pieces shared by the forward and backward kernels (kernels/hopper_bwd.py)
# --------------------------------------------------------------------------------------------------


def layout_helpers(interpreted: bool):
    """(cast, iota): register layouts (wgmma's accumulator layout) are compile-time annotations; the CPU
    interpreter has no rule for them and needs none."""
    if interpreted:
        return (lambda x, layout: x), functools.partial(lax.broadcasted_iota, jnp.int32)
    return plgpu.layout_cast, functools.partial(plgpu.broadcasted_iota, jnp.int32, layout=plgpu.Layout.WGMMA)


def visible(rows, cols, valid, offset, *, causal: bool, has_lengths: bool):
    """Which (query row, key column) pairs of a tile attend: the key inside the valid length, at or before the
    row's bottom-right aligned diagonal when causal, and (with lengths) the query row inside it too."""
    vis = cols < valid
    if causal:
        vis = vis & (cols <= rows + offset)
    if has_lengths:
        vis = vis & (rows < valid)
    return vis


def dot_nt(a_ref, b_ref, interpreted: bool, after_issue=None):
    """a `[m, d]` · b `[n, d]`ᵀ → float32 `[m, n]`, both operands in shared memory; `after_issue` runs between
    issuing the wgmma and waiting for it (the ping-pong schedule point). The CPU interpreter's wgmma takes no
    transposed operand: there a plain dot."""
    if interpreted:
        out = lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
        if after_issue is not None:
            after_issue()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((a_ref.shape[0], b_ref.shape[0]), jnp.float32))


def acc_dot(acc, a, b_ref, interpreted: bool, after_issue=None):
    """acc `[m, d]` += a `[m, k]` (registers) · b `[k, d]` (shared memory); `after_issue` runs while the wgmma
    does. The CPU interpreter's wgmma takes no register operand: there a plain dot."""
    if interpreted:
        out = acc + lax.dot_general(a, b_ref[...], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        if after_issue is not None:
            after_issue()
        return out

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        if after_issue is not None:
            after_issue()

    return pl.run_state(body)(plgpu.ACC.init(acc))


def overlapped_products(a_ref, b_ref, acc, x, c_ref, on_first, interpreted: bool):
    """(on_first(a·bᵀ), acc + x·c): the wgmma of S = a·bᵀ (shared-memory operands) and the accumulation of x·c
    (x registers, c shared memory) are issued back to back; `on_first` runs on S while the second one computes
    (FlashAttention-3's intra-warpgroup overlap). The CPU interpreter: plain dots in the same order."""
    if interpreted:
        y = on_first(dot_nt(a_ref, b_ref, True))
        return y, acc_dot(acc, x, c_ref, True)

    def body(s_ref, o_ref):
        o_ref[...] = acc
        plgpu.wgmma(s_ref, a_ref, plgpu.transpose_ref(b_ref, (1, 0)))
        plgpu.wgmma(o_ref, x, c_ref)
        y = on_first(plgpu.wgmma_accumulator_load(s_ref, wait_n=1))
        return y, plgpu.wgmma_accumulator_load(o_ref, wait_n=0)

    return pl.run_scoped(body, plgpu.ACC((a_ref.shape[0], b_ref.shape[0]), jnp.float32),
                         plgpu.ACC(acc.shape, jnp.float32))


def kv_streams(k_ref, v_ref, b, kv_head, bs: int, k_ring, v_ring):
    """`ring_producer` streams of K and V blocks of one KV head; each ring is (smem, ready, free)."""
    def stream(ref, ring):
        smem, ready, free = ring
        return free, [(lambda blk: ref.at[b, pl.ds(blk * bs, bs), kv_head], smem, ready)]

    return [stream(k_ref, k_ring), stream(v_ref, v_ring)]


def ring_producer(count, stages: int, block_at, streams, rows: int | None = None, base=0, drain: bool = True) -> None:
    """The producer warpgroup of a TMA ring of `stages` slots, walking `count` steps.

    For step `it` (block `block_at(it)`), each stream `(free, copies)` first waits until the consumers released
    the slot's previous contents (`free`, from the second round on), then issues its copies `(src, ring, ready)`:
    `src(block)` (a global-memory ref) into `ring.at[slot]`, completing on `ready.at[slot]`. With `rows`,
    `block_at(it)` gives a tuple of blocks and block e goes to rows `[e·rows, (e+1)·rows)` of the slot (one
    barrier arrival per copy). Ring positions continue from `base` (steps of earlier work items of a
    persistent CTA). With `drain`, at the end it observes the last releases too, so every barrier phase is
    waited on before the CTA's barriers go away (the interpreter checks this; on the GPU it costs the idle
    producer only); a persistent CTA drains once, after its last item (:func:`ring_drain`)."""

    @pl.loop(0, count)
    def _fetch(it):
        slot = lax.rem(base + it, jnp.int32(stages))
        block = block_at(it)
        for free, copies in streams:

            @pl.when(base + it >= stages)
            def _(free=free):
                plgpu.barrier_wait(free.at[slot])

            for src, ring, ready in copies:
                if rows is None:
                    plgpu.copy_gmem_to_smem(src(block), ring.at[slot], ready.at[slot])
                else:
                    for e, blk in enumerate(block):
                        plgpu.copy_gmem_to_smem(src(blk), ring.at[slot, pl.ds(e * rows, rows)], ready.at[slot])

    if drain:
        ring_drain(base + count, stages, [free for free, _ in streams])


def ring_drain(total, stages: int, frees) -> None:
    """Waits for the consumers' releases of the last `stages` of `total` ring steps (barriers `frees`)."""

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _drain(it):
        slot = lax.rem(it, jnp.int32(stages))
        for free in frees:
            plgpu.barrier_wait(free.at[slot])


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


def _kernel_body(
    lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, scoped, *, plan: HopperPlan, interpreted: bool,
    rm_ref=None, lse_ref=None,
):
    sh = plan.shape
    bs, d, stages, consumers = sh.block_size, sh.head_dim, plan.stages, plan.consumers
    dtype = q_ref.dtype
    (q_smem, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free, q_free), schedule = scoped[:4]
    if plan.emit_stats:
        rm_stage, lse_stage = scoped[4]  # float32 [consumers, 2, rowmax_batch·per_step, 64] and [consumers, 64]
    elif plan.emit_lse:
        (lse_stage,) = scoped[4]

    def schedule_point():  # pingpong: arrive, then wait for the other compute warpgroup's matching arrival
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    wg = lax.axis_index("wg")
    tpw, n_tiles = plan.tiles_per_wg, plan.tiles_per_cta
    per_step = plan.per_step
    kw = per_step * bs  # keys per loop step
    cast, iota = layout_helpers(interpreted)

    def item(qblk, chunk, b):
        """One work item: a list row's query block, CTA chunk and batch, and what the loops need of it."""
        mhead = lax.div(chunk, jnp.int32(plan.ctas_per_row)) if plan.ctas_per_row > 1 else chunk
        first_tile = lax.rem(chunk, jnp.int32(plan.ctas_per_row)) * n_tiles if plan.ctas_per_row > 1 else 0
        kv_head = lax.div(mhead * plan.share, jnp.int32(sh.group)) if sh.group > 1 else mhead
        count = spans_ref[b, mhead, qblk, 2]
        n_full = spans_ref[b, mhead, qblk, 1]  # lo == 0 for row lists: [0, hi) full, [hi, count) masked
        if per_step == 1:
            n_steps, full_steps, pair_steps = count, n_full, count
        else:  # pairs of entries; a pair with a masked entry is masked, and an odd count's last entry is a
            # single-block step of its own (masked; its ring slot holds the block twice, the copy is not read)
            n_steps, full_steps = lax.div(count + 1, jnp.int32(2)), lax.div(n_full, jnp.int32(2))
            pair_steps = lax.div(count, jnp.int32(2))
        return types.SimpleNamespace(qblk=qblk, b=b, mhead=mhead, first_tile=first_tile, kv_head=kv_head,
                                     count=count, n_steps=n_steps, full_steps=full_steps, pair_steps=pair_steps)

    def tile_coords(it, t):
        """(first query row, query head) of the CTA's t-th 64-row tile of item `it`."""
        tile = it.first_tile + t
        if plan.subtiles > 1:
            head_off, sub = lax.div(tile, jnp.int32(plan.subtiles)), lax.rem(tile, jnp.int32(plan.subtiles))
        else:
            head_off, sub = tile, 0
        return it.qblk * bs + sub * WG_ROWS, it.mhead * plan.share + head_off

    if plan.persistent:
        # Work items w = cta, cta + P, ... in the order of the non-persistent grid: long causal rows first.
        cta, n_ctas = lax.axis_index("p"), plan.persistent
        per_q = plan.mask_heads * plan.ctas_per_row * sh.batch
        my_items = lax.div(jnp.int32(sh.nq * per_q) - cta + (n_ctas - 1), jnp.int32(n_ctas))

        def item_at(i):
            w = cta + i * n_ctas
            if plan.head_major:  # (batch, mask head) outermost, then query blocks (long rows first), then chunk
                per_head = sh.nq * plan.ctas_per_row
                g, r = lax.div(w, jnp.int32(per_head)), lax.rem(w, jnp.int32(per_head))
                mhead = lax.rem(g, jnp.int32(plan.mask_heads))
                chunk = mhead * plan.ctas_per_row + lax.rem(r, jnp.int32(plan.ctas_per_row))
                return item(sh.nq - 1 - lax.div(r, jnp.int32(plan.ctas_per_row)), chunk,
                            lax.div(g, jnp.int32(plan.mask_heads)))
            r = lax.rem(w, jnp.int32(per_q))
            return item(sh.nq - 1 - lax.div(w, jnp.int32(per_q)), lax.div(r, jnp.int32(sh.batch)),
                        lax.rem(r, jnp.int32(sh.batch)))
    else:
        here = item(sh.nq - 1 - lax.axis_index("q"), lax.axis_index("h"), lax.axis_index("b"))

    @pl.when(wg < consumers)
    def _compute():
        if consumers == 2:
            plgpu.set_max_registers(232, action="increase")
        scale2 = jnp.float32(sh.sm_scale * LOG2_E)
        offset = sh.kv_len - sh.q_len

        def release_buffer(buf):
            """Once the output stores issued so far have read Q buffer `buf`, the producer may load the Q of the
            item after next into it (persistent). With `late_release` this runs for the previous item's buffer
            during the next item's first step, when the store is long done."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.barrier_arrive(q_free.at[buf])

        def run_item(it, buf, gbase, pending=False):
            """This warpgroup's tiles of item `it`, Q in buffer `buf`, ring steps numbered from `gbase`; `pending`:
            (late_release) the previous item's buffer is still to be released."""
            tiles = []  # (smem slot, first query row, query head) of this warpgroup's tiles
            for j in range(tpw):
                tiles.append((wg * tpw + j, *tile_coords(it, wg * tpw + j)))
            if not plan.persistent:  # (persistent: the producer loads Q, one item ahead)
                for slot_q, row0, head in tiles:
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[it.b, pl.ds(row0, WG_ROWS), head], q_smem.at[0, slot_q], q_ready.at[slot_q]
                    )
            for slot_q, _, _ in tiles:
                plgpu.barrier_wait(q_ready.at[buf * n_tiles + slot_q])
            valid = valid_ref[it.b]

            def key_columns(start):
                if not isinstance(start, tuple):  # one block per step, or an odd count's single last entry
                    return iota((WG_ROWS, bs), 1) + start
                c = iota((WG_ROWS, kw), 1)  # two blocks side by side: columns from each one's start
                return jnp.where(c < bs, c + start[0], c + (start[1] - bs))

            def softmax_update(s, row0, start, acc, m_prev, l_prev, masked: bool):
                p16, alpha, m_next, l_next, halves = softmax_stats(s, row0, start, m_prev, l_prev, masked)
                return p16, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m_next, l_next, halves

            def softmax_stats(s, row0, start, m_prev, l_prev, masked: bool, convert: bool = True):
                """The online softmax of one S tile: (P in the input dtype, or float32 without `convert`, the
                accumulator's rescale factor, the new row maximum and sum, each listed block's row maximum with
                emit_stats)."""
                if masked:
                    rows = iota(s.shape, 0) + row0
                    cols = key_columns(start)
                    vis = visible(rows, cols, valid, offset, causal=sh.causal, has_lengths=plan.has_lengths)
                    s = jnp.where(vis, s, -jnp.inf)
                if plan.emit_stats and s.shape[1] == 2 * bs:  # each 64-key block's row maximum, for the pooled map
                    # Static column slices on a tile boundary take the registers of one block: two half-width
                    # reductions cost what one full-width one does (a masked select per half cost two more passes).
                    halves = tuple(s[:, e * bs:(e + 1) * bs].max(axis=1) * scale2 for e in range(2))
                    block_max = jnp.maximum(*halves)
                else:
                    block_max = s.max(axis=1) * scale2
                    halves = (block_max,)
                m_next = jnp.maximum(m_prev, block_max)
                if masked:  # a row may have seen nothing yet: keep exp2 away from (-inf) - (-inf)
                    m_use = jnp.where(m_next == -jnp.inf, 0.0, m_next)
                else:
                    m_use = m_next
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_use, s.shape, [0]))
                alpha = jnp.exp2(m_prev - m_use)
                l_next = l_prev * alpha + p.sum(axis=1)
                return (p.astype(dtype) if convert else p), alpha, m_next, l_next, halves

            def wait_next_k(i):  # early_wait: the next step's K, while this step's P V wgmma runs
                @pl.when(i + 1 < it.n_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(gbase + i + 1, jnp.int32(stages))])

            def step_start(i):
                if per_step == 1:
                    return lists_ref[it.b, it.mhead, it.qblk, i] * bs
                e0 = i * 2
                first = lists_ref[it.b, it.mhead, it.qblk, e0] * bs
                second = lists_ref[it.b, it.mhead, it.qblk, lax.min(e0 + 1, it.count - 1)] * bs
                # No second entry: its columns start far past any valid length, so they are all masked out.
                return first, jnp.where(e0 + 1 < it.count, second, jnp.int32(1 << 30))

            def store_row_maxima(it, i, halves, row0, head):
                """rowmax_batch R > 1: step i's block maxima go to slot i mod R of a stage of R steps' blocks (two
                stages, alternating); the stage goes out in one TMA store after its last step or the item's last.
                The item's lists are 0, 1, ..., count - 1, so the stage of steps [jR, jR + R) holds the key blocks
                from j·R·per_step on. A last stage's unwritten slots land on blocks past the row's last visible
                one (the row-max buffer is padded to whole stages), which the pooling epilogue masks out."""
                rb = plan.rowmax_batch
                batch, pos = lax.div(i, jnp.int32(rb)), lax.rem(i, jnp.int32(rb))
                stage = rm_stage.at[wg, lax.rem(batch, jnp.int32(2))]

                @pl.when(pos == 0)
                def _():  # all stores but the latest have read their stage: the latest is never this one's
                    plgpu.wait_smem_to_gmem(1, wait_read_only=True)

                for e, row_max in enumerate(halves):  # (an odd count's last entry is a single step)
                    stage.at[pos * per_step + e][...] = row_max

                @pl.when((pos == rb - 1) | (i == it.n_steps - 1))
                def _():
                    plgpu.commit_smem()
                    blocks = rb * per_step
                    plgpu.copy_smem_to_gmem(stage, rm_ref.at[it.b, head, pl.ds(batch * blocks, blocks),
                                                             pl.ds(row0, WG_ROWS)])

            def step(i, carry, masked: bool, single: bool = False):
                """Ring step `i`: S = Q Kᵀ over the slot's keys, the softmax update, P V. `single`: only the
                slot's first block (an odd count's last entry)."""
                slot = lax.rem(gbase + i, jnp.int32(stages))
                k_in, v_in = k_smem.at[slot], v_smem.at[slot]
                if single:
                    k_in, v_in = k_smem.at[slot, pl.ds(0, bs)], v_smem.at[slot, pl.ds(0, bs)]
                if plan.late_release:
                    pl.when((i == 0) & pending)(functools.partial(release_buffer, 1 - buf))
                if not plan.early_wait:
                    plgpu.barrier_wait(k_ready.at[slot])
                start = step_start(i) if masked else None
                if single:
                    start = start[0]
                # Tile by tile: S = Q Kᵀ, then its softmax update right away, so only one float32 S tile is live
                # next to the accumulators (two tiles per warpgroup: 2 × 64 + 32 + 2 × 16 registers of values).
                updated = []
                for j, ((slot_q, row0, _), carry_j) in enumerate(zip(tiles, carry)):
                    s_j = dot_nt(q_smem.at[buf, slot_q], k_in, interpreted,
                                 after_issue=schedule_point if plan.pingpong else None)
                    if j == len(tiles) - 1:  # the last S is in registers: K's slot is free before the softmax
                        plgpu.barrier_arrive(k_free.at[slot])
                    *update, halves = softmax_update(s_j, row0, start, *carry_j, masked=masked)
                    updated.append(update)
                    if plan.emit_stats:  # tiles_per_wg == 1: this is the warpgroup's only tile
                        if plan.rowmax_batch > 1:
                            store_row_maxima(it, i, halves, row0, tiles[0][2])
                        else:
                            for e, row_max in enumerate(halves):  # (an odd count's last entry is a single step)
                                stage = rm_stage.at[wg, lax.rem(i, jnp.int32(2)), e]
                                # The stores issued since this slot's last one: the rest of that step's, the
                                # previous step's and this step's so far (at most 2·per_step - 1): the one before
                                # has read it. (Each item starts after a full wait: its output buffer's release.)
                                plgpu.wait_smem_to_gmem(2 * per_step - 1, wait_read_only=True)
                                stage[...] = row_max
                                plgpu.commit_smem()
                                key_block = lists_ref[it.b, it.mhead, it.qblk, i * per_step + e]
                                plgpu.copy_smem_to_gmem(
                                    stage, rm_ref.at[it.b, tiles[0][2], key_block, pl.ds(row0, WG_ROWS)])
                if plan.pingpong:
                    plgpu.barrier_arrive(schedule)  # softmax done
                    plgpu.barrier_wait(v_ready.at[slot])
                    plgpu.barrier_wait(schedule)  # the other warpgroup's QKᵀ has been issued: our turn for PV
                else:
                    plgpu.barrier_wait(v_ready.at[slot])
                new_carry = []
                for j, (p16, acc, m_next, l_next) in enumerate(updated):
                    hook = functools.partial(wait_next_k, i) if plan.early_wait and j == len(updated) - 1 else None
                    new_carry.append((acc_dot(acc, p16, v_in, interpreted, after_issue=hook), m_next, l_next))
                plgpu.barrier_arrive(v_free.at[slot])
                return tuple(new_carry)

            def run_overlapped(carry0):
                """The steps with intra-warpgroup overlap (one tile): step i issues S_i and P_{i-1} V_{i-1} together and
                runs S_i's softmax under the product; the first step has no product before it, the last product
                follows the loop. Every step after the full ones is masked (an odd count's last pair padded)."""
                (slot_q, row0, _), = tiles
                q_tile = q_smem.at[buf, slot_q]

                def slot_of(i):
                    return lax.rem(gbase + i, jnp.int32(stages))

                def stats_of(i, slot, m, l, masked):
                    start = step_start(i) if masked else None

                    def on_s(s):
                        plgpu.barrier_arrive(k_free.at[slot])  # S is in registers: K's slot is free
                        # P stays float32 (in S's registers) until P_{i-1} V_{i-1} is done: writing the bf16 P
                        # registers while that wgmma reads P_{i-1} makes ptxas serialize every wgmma (C7513).
                        p, alpha, m_next, l_next, _ = softmax_stats(s, row0, start, m, l, masked, convert=False)
                        return p, alpha, m_next, l_next

                    return on_s

                def first(_, c):
                    acc, m, l, _ = c
                    slot = slot_of(0)
                    if plan.late_release:
                        pl.when(pending)(functools.partial(release_buffer, 1 - buf))
                    plgpu.barrier_wait(k_ready.at[slot])
                    p, alpha, m, l = stats_of(0, slot, m, l, True)(dot_nt(q_tile, k_smem.at[slot], interpreted))
                    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m, l, p.astype(dtype)

                def middle(i, c, masked: bool):
                    acc, m, l, p_prev = c
                    slot, prev = slot_of(i), slot_of(i - 1)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[prev])
                    (p, alpha, m, l), acc = overlapped_products(
                        q_tile, k_smem.at[slot], acc, p_prev, v_smem.at[prev], stats_of(i, slot, m, l, masked),
                        interpreted)
                    plgpu.barrier_arrive(v_free.at[prev])
                    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m, l, p.astype(dtype)

                def last(_, c):
                    acc, m, l, p_prev = c
                    prev = slot_of(it.n_steps - 1)
                    plgpu.barrier_wait(v_ready.at[prev])
                    acc = acc_dot(acc, p_prev, v_smem.at[prev], interpreted)
                    plgpu.barrier_arrive(v_free.at[prev])
                    return acc, m, l, p_prev

                acc, m, l = carry0
                c = (acc, m, l, cast(jnp.full((WG_ROWS, kw), 0, dtype), plgpu.Layout.WGMMA))
                any_steps = jnp.minimum(it.n_steps, 1)
                c = lax.fori_loop(0, any_steps, first, c)
                unmasked_end = jnp.maximum(it.full_steps, 1)
                c = lax.fori_loop(1, unmasked_end, functools.partial(_call_step, middle, False), c)
                c = lax.fori_loop(unmasked_end, it.n_steps, functools.partial(_call_step, middle, True), c)
                c = lax.fori_loop(0, any_steps, last, c)
                return (c[:3],)

            carry = tuple(
                (
                    cast(jnp.full((WG_ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA),
                    cast(jnp.full((WG_ROWS,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                    cast(jnp.full((WG_ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
                )
                for _ in tiles
            )
            if plan.early_wait:  # the first step's K (later ones are waited for inside the previous step)
                @pl.when(it.n_steps > 0)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(gbase, jnp.int32(stages))])
            # pingpong: the second warpgroup starts each item half a step behind the first. (Once per persistent
            # CTA is not enough: an item with no steps lets the first warpgroup run an item ahead, into the Q
            # buffer the second still holds, while the second waits for the first's next schedule arrival.)
            if plan.pingpong:
                pl.when(wg == 1)(schedule_point)
            if plan.overlap:
                carry = run_overlapped(carry[0])
            elif plan.any_masked or per_step > 1:
                carry = lax.fori_loop(0, it.full_steps, functools.partial(_call_step, step, False), carry)
                carry = lax.fori_loop(it.full_steps, it.pair_steps, functools.partial(_call_step, step, True), carry)
                if per_step > 1:  # an odd count's last entry: one block, not a padded pair
                    carry = lax.fori_loop(it.pair_steps, it.n_steps,
                                          lambda i, c: step(i, c, True, single=True), carry)
            else:
                carry = lax.fori_loop(0, it.count, functools.partial(_call_step, step, False), carry)
            if plan.pingpong:  # ... and the first one ends it with the matching extra arrival
                pl.when(wg == 0)(schedule_point)
            if plan.late_release:  # an item with no steps releases the previous buffer here
                pl.when((it.n_steps == 0) & pending)(functools.partial(release_buffer, 1 - buf))
            # The output goes out through the Q tile's buffer (Q is no longer read).
            for (slot_q, row0, head), (acc, m, l) in zip(tiles, carry):
                l_safe = jnp.where(l == 0.0, 1.0, l)  # empty row: acc is 0, so the output is 0
                inv_l = 1.0 / l_safe  # one division per row, then a multiply per element
                q_smem.at[buf, slot_q][...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
                if plan.writes_lse:
                    lse_stage.at[wg][...] = jnp.where(l == 0.0, -jnp.inf, m + jnp.log2(l_safe))
            plgpu.commit_smem()
            for slot_q, row0, head in tiles:
                plgpu.copy_smem_to_gmem(q_smem.at[buf, slot_q], o_ref.at[it.b, pl.ds(row0, WG_ROWS), head])
                if plan.writes_lse:
                    plgpu.copy_smem_to_gmem(lse_stage.at[wg], lse_ref.at[it.b, head, pl.ds(row0, WG_ROWS)])
            if not plan.persistent:
                plgpu.wait_smem_to_gmem(0)
            elif not plan.late_release:  # (late: released during the next item's first step, or after the last)
                release_buffer(buf)
            return gbase + it.n_steps

        if plan.persistent:
            lax.fori_loop(0, my_items, lambda i, g: run_item(item_at(i), lax.rem(i, jnp.int32(2)), g, i > 0),
                          jnp.int32(0))
            if plan.late_release:  # the last item's buffer
                pl.when(my_items > 0)(functools.partial(release_buffer, lax.rem(my_items - 1, jnp.int32(2))))
            plgpu.wait_smem_to_gmem(0)
        else:
            run_item(here, 0, 0)

    @pl.when(wg == consumers)
    def _produce():
        if consumers == 2:
            plgpu.set_max_registers(40, action="decrease")

        def produce_item(it, local_i, gbase):
            if plan.persistent:  # Q of this item, once the item two back has stored its output from the buffer
                buf = lax.rem(local_i, jnp.int32(2))

                @pl.when(local_i >= 2)
                def _():
                    plgpu.barrier_wait(q_free.at[buf])

                for t in range(n_tiles):
                    row0, head = tile_coords(it, t)
                    plgpu.copy_gmem_to_smem(
                        q_ref.at[it.b, pl.ds(row0, WG_ROWS), head], q_smem.at[buf, t], q_ready.at[buf * n_tiles + t]
                    )
            streams = kv_streams(k_ref, v_ref, it.b, it.kv_head, bs, (k_smem, k_ready, k_free), (v_smem, v_ready, v_free))
            drain = not plan.persistent
            if per_step == 1:
                ring_producer(it.count, stages, lambda i: lists_ref[it.b, it.mhead, it.qblk, i], streams,
                              base=gbase, drain=drain)
            else:
                def pair_at(i):  # an odd count's last step fetches its block twice (the copy is masked out)
                    return (lists_ref[it.b, it.mhead, it.qblk, 2 * i],
                            lists_ref[it.b, it.mhead, it.qblk, lax.min(2 * i + 1, it.count - 1)])

                ring_producer(it.n_steps, stages, pair_at, streams, rows=bs, base=gbase, drain=drain)
            return gbase + it.n_steps

        if plan.persistent:
            total = lax.fori_loop(0, my_items, lambda i, g: produce_item(item_at(i), i, g), jnp.int32(0))
            ring_drain(total, stages, (k_free, v_free))
            for back in (2, 1):  # the last two items' buffer releases (earlier ones were waited for above)
                @pl.when(my_items >= back)
                def _(back=back):
                    plgpu.barrier_wait(q_free.at[lax.rem(my_items - back, jnp.int32(2))])
        else:
            produce_item(here, 0, 0)


def _call_step(step, masked, i, carry):
    """A fori_loop body: `step(i, carry, masked)`."""
    return step(i, carry, masked)


def _kernel_call(body, out_type, **kwargs):
    """plgpu.kernel with the output type under whichever keyword this jax version takes."""
    params = inspect.signature(plgpu.kernel).parameters
    key = "out_type" if "out_type" in params else "out_shape"
    return plgpu.kernel(body, **{key: out_type}, **kwargs)


def _forward_call(plan: HopperPlan, lists, spans, valid, q, k, v, interpret=None):
    """Padded q `[B,Tp,Hq,D]`, k/v `[B,Sp,Hkv,D]` → out `[B,Tp,Hq,D]` (every row written); with `emit_lse`
    `(out, lse)`, with `emit_stats` `(out, rowmax, lse)` (see :class:`HopperPlan`)."""
    sh = plan.shape
    d, bs, stages, consumers = sh.head_dim, sh.block_size, plan.stages, plan.consumers
    dtype = q.dtype
    # 128-byte swizzle: 64 16-bit elements per swizzled row, the layout wgmma reads.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, *stat_refs):
        lse_stage = plgpu.SMEM((consumers, WG_ROWS), jnp.float32)
        if plan.emit_stats:
            stats = ((plgpu.SMEM((consumers, 2, plan.rowmax_batch * plan.per_step, WG_ROWS), jnp.float32), lse_stage),)
        else:
            stats = ((lse_stage,),) if plan.emit_lse else ()
        if plan.emit_lse and not plan.emit_stats:
            stat_refs = (None, *stat_refs)  # (rm_ref, lse_ref)
        pl.run_scoped(
            lambda *scoped: _kernel_body(
                lists_ref, spans_ref, valid_ref, q_ref, k_ref, v_ref, o_ref, scoped, plan=plan,
                interpreted=interpret is not None, **dict(zip(("rm_ref", "lse_ref"), stat_refs)),
            ),
            (
                plgpu.SMEM((plan.qbufs, plan.tiles_per_cta, WG_ROWS, d), dtype, transforms=transforms),
                plgpu.SMEM((stages, plan.per_step * bs, d), dtype, transforms=transforms),
                plgpu.SMEM((stages, plan.per_step * bs, d), dtype, transforms=transforms),
            ),
            (
                plgpu.Barrier(num_arrivals=plan.per_step, num_barriers=stages),  # one arrival per TMA copy
                plgpu.Barrier(num_arrivals=plan.per_step, num_barriers=stages),
                plgpu.Barrier(num_barriers=plan.qbufs * plan.tiles_per_cta),
            ),
            (
                plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
                plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),
                plgpu.Barrier(num_arrivals=consumers, num_barriers=2),  # Q buffers free (persistent only)
            ),
            plgpu.Barrier(num_arrivals=consumers),  # pingpong schedule (unused without it)
            *stats,
            collective_axes="wg",
        )

    out_type = jax.ShapeDtypeStruct(q.shape, dtype)
    b, t_pad = q.shape[0], q.shape[1]
    lse_type = jax.ShapeDtypeStruct((b, sh.q_heads, t_pad), jnp.float32)
    if plan.emit_stats:
        out_type = (out_type, jax.ShapeDtypeStruct((b, sh.q_heads, plan.rowmax_blocks, t_pad), jnp.float32), lse_type)
    elif plan.emit_lse:
        out_type = (out_type, lse_type)
    kernel = _kernel_call(
        entry,
        out_type,
        **(dict(grid=(plan.persistent,), grid_names=("p",)) if plan.persistent else
           dict(grid=(sh.nq, plan.mask_heads * plan.ctas_per_row, sh.batch), grid_names=("q", "h", "b"))),
        num_threads=consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, **({} if plan.auto_barriers else {"unsafe_no_auto_barriers": True})
        ),
        **({} if interpret is None else {"interpret": interpret}),
    )
    return kernel(lists, spans, valid, q, k, v)


def _prepare(q, k, v, block_mask, lengths, sh: AttentionShape, interpret, *, tables: bool = False):
    """The kernel's inputs: row lists and spans of the visible selected blocks, valid lengths, and q, k, v
    padded to whole blocks; with `tables` also the block tables `(visible, full)` they came from (the
    backward's transposed lists are built from them)."""
    visible, full = block_tables(block_mask, sh, lengths)
    lists, spans = compact_block_lists(visible, full, implementation="xla" if interpret is not None else None)
    t_pad, s_pad = sh.nq * sh.block_size, sh.nk * sh.block_size
    inputs = (lists, spans, valid_lengths(sh, lengths), _pad_seq(q, t_pad), _pad_seq(k, s_pad), _pad_seq(v, s_pad))
    return (inputs, (visible, full)) if tables else inputs


@functools.partial(jax.jit, static_argnames=("plan", "interpret"))
def _forward_jit(q, k, v, block_mask, lengths, plan: HopperPlan, interpret=None):
    out_p = _forward_call(plan, *_prepare(q, k, v, block_mask, lengths, plan.shape, interpret), interpret)
    return out_p[:, : plan.shape.q_len]


def forward_with_residuals(q, k, v, block_mask, lengths, plan: HopperPlan, interpret=None):
    """The forward (`plan` with any launch; the log-sum-exp output is added) and what the Hopper backward
    (:func:`seerjax.kernels.hopper_bwd.backward_hopper`) takes: `(out, residuals)`, the log-sum-exp in its
    `[B, Hq, Tp]` layout with +inf on rows that see no key."""
    sh = plan.shape
    plan = dataclasses.replace(plan, emit_lse=True)
    (lists, spans, valid, q_p, k_p, v_p), (visible, full) = _prepare(
        q, k, v, block_mask, lengths, sh, interpret, tables=True)
    out_p, lse = _forward_call(plan, lists, spans, valid, q_p, k_p, v_p, interpret)
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # the backward's convention: exp2(s - lse) = 0 on empty rows
    return out_p[:, : sh.q_len], (q_p, k_p, v_p, out_p, lse, lists, spans, valid, visible, full)


def block_sparse_attention_hopper(
    q, k, v, block_mask, shape: AttentionShape, *, lengths=None, stages: int | None = None,
    consumers: int | None = None, tiles_per_wg: int | None = None, pingpong: bool = False,
    pair_blocks: bool = False, early_wait: bool = False, auto_barriers: bool | None = None, persistent: int = 0,
    head_major: bool = False, late_release: bool = False, overlap: bool = False, interpret=None,
):
    """Block-sparse attention forward on Hopper (Pallas Mosaic GPU); not differentiable (the dispatch entry
    :func:`block_sparse_attention_sm90` is).

    Args:
      q: `[B, T, Hq, D]`; k, v: `[B, S, Hkv, D]` (validated; `shape` is their AttentionShape).
      block_mask: bool `[B, Hm, nq, nk]`, Hm in {Hq, Hkv}.
      lengths: optional int `[B]` right-padding lengths.
      stages, consumers, tiles_per_wg, pingpong, pair_blocks, early_wait, auto_barriers, persistent, head_major,
      late_release, overlap:
        launch shape and schedule (tuning; see :class:`HopperPlan`); None picks defaults.
      interpret: None (compile for the GPU) or Mosaic GPU interpret-mode parameters (jax's private
        `InterpretGPUParams`): runs the kernel on CPU, simulating warpgroups, TMA and barriers (tests).

    Returns:
      out `[B, T, Hq, D]` in q's dtype; rows with no visible selected key are zero.
    """
    mask_heads = int(block_mask.shape[1])
    if not hopper_supported(shape, mask_heads, q.dtype):
        raise ValueError(
            f"block_sparse_attention_hopper does not support dtype {jnp.dtype(q.dtype).name}, head_dim "
            f"{shape.head_dim}, block_size {shape.block_size}, mask heads {mask_heads}; expected dtype in "
            f"{[t.name for t in SUPPORTED_DTYPES]}, head_dim in {SUPPORTED_HEAD_DIMS}, block_size in "
            f"{SUPPORTED_BLOCK_SIZES} (use the portable kernel)"
        )
    plan = make_hopper_plan(
        shape, mask_heads, lengths is not None, stages=stages, consumers=consumers, tiles_per_wg=tiles_per_wg,
        pingpong=pingpong, pair_blocks=pair_blocks, early_wait=early_wait, auto_barriers=auto_barriers,
        persistent=persistent, head_major=head_major, late_release=late_release, overlap=overlap,
    )
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    return _forward_jit(q, k, v, block_mask, lengths, plan, interpret)


# --------------------------------------------------------------------------------------------------
# Dispatch entry: the Hopper forward where it applies, the portable kernels everywhere else
# --------------------------------------------------------------------------------------------------


def is_hopper_device(device=None) -> bool:
    """True for an NVIDIA GPU of compute capability 9.0 or newer (Mosaic GPU's wgmma/TMA path)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return False
    try:
        major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    except ValueError:
        return False
    return major >= 9


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _differentiable(q, k, v, block_mask, lengths, hplan: HopperPlan | None, pplan, bplan):
    """Block-sparse attention with the Mosaic GPU forward (`hplan`) and/or backward (`bplan`; a
    :class:`seerjax.kernels.hopper_bwd.BwdPlan`), the portable Triton kernel where one is None."""
    if hplan is not None:
        return _forward_jit(q, k, v, block_mask, lengths, hplan)
    from seerjax.kernels import block_sparse as bsp

    return bsp._forward(q, k, v, block_mask, lengths, pplan, False)[0]


def _differentiable_fwd(q, k, v, block_mask, lengths, hplan, pplan, bplan):
    from seerjax.kernels import block_sparse as bsp
    from seerjax.kernels import hopper_bwd

    if bplan is None:  # the portable backward takes the portable forward's residuals
        return bsp._forward(q, k, v, block_mask, lengths, pplan, False)
    if hplan is None:
        out, residuals = bsp._forward(q, k, v, block_mask, lengths, pplan, False)
        return out, hopper_bwd.from_portable_residuals(residuals)
    return forward_with_residuals(q, k, v, block_mask, lengths, hplan)


def _differentiable_bwd(hplan, pplan, bplan, residuals, d_out):
    from seerjax.kernels import block_sparse as bsp
    from seerjax.kernels import hopper_bwd

    if bplan is None:
        dq, dk, dv = bsp._backward(pplan, False, residuals, d_out)
    else:
        dq, dk, dv = hopper_bwd.backward_hopper(bplan, residuals, d_out)
    return dq, dk, dv, None, None


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)
_differentiable_jit = jax.jit(_differentiable, static_argnums=(5, 6, 7))


def sm_count(device=None) -> int:
    """Streaming multiprocessors of the GPU (the persistent grid's CTA count); 132 (an H100 SXM) if unknown."""
    device = device or jax.devices()[0]
    count = getattr(device, "core_count", None)
    return int(count) if isinstance(count, int) and count > 0 else 132


HEAD_MAJOR_MIN_KV_BYTES = 48 * 2**20  # K and V of all heads above this (most of an H100's 50 MB L2): head-major


def tuned_launch(shape: AttentionShape, mask_heads: int, n_sms: int) -> dict | None:
    """The launch options measured fastest on an H100 (docs/kernel_notes.md, eighth to tenth sessions) for this
    call, or None where the portable Triton kernel was faster.

    * Per-KV-head masks at block 64 (several query heads share a list row): two blocks per step, the next K
      waited for under P V, no automatic barriers, ping-pong between the two compute warpgroups, and a
      persistent grid of one CTA per SM: 1.80–1.92 ms against Triton's 2.62–3.04 ms at 32k, density 0.1,
      and 23.8 against 34.8 ms at 128k. Items head-major only where all heads' K and V overflow the L2
      (HEAD_MAJOR_MIN_KV_BYTES): at 8k dense head-major took 1.26–1.30 ms, query-block-major 1.10–1.14 ms,
      cuDNN 1.30–1.33 ms (ninth session). Output buffers released late: 1.73–1.79 against 1.78–1.83 ms at 32k,
      density 0.1 (same rounds), no change at 8k dense. Intra-warpgroup overlap instead of ping-pong (`overlap`)
      was 2% faster at 32k, density 0.1 (1.57–1.69 against 1.64–1.76 ms) but slower on short rows (8k, density
      0.1: 0.446 against 0.28–0.34 ms in the bench), so ping-pong stays (tenth session).
    * Per-query-head masks at block 64 (64 query rows per CTA): None, the Triton kernel (2.86–2.94 ms against
      3.10–3.30 ms at 32k, density 0.1).
    * Block 128: the default launch (first version; not re-tuned).
    """
    share = shape.q_heads // mask_heads
    if shape.block_size != 64:
        return {}
    if share == 1:
        return None
    consumers = 2 if share % 2 == 0 else 1
    kv_bytes = 2 * shape.batch * shape.kv_len * shape.kv_heads * shape.head_dim * 2
    return dict(consumers=consumers, pingpong=consumers == 2, pair_blocks=True, early_wait=True,
                auto_barriers=False, persistent=n_sms, head_major=kv_bytes > HEAD_MAJOR_MIN_KV_BYTES, late_release=True)


def block_sparse_attention_sm90(q, k, v, block_mask, shape: AttentionShape, *, lengths=None):
    """The kernels dispatch's `"hopper"` entry (and `implementation=None` on sm_90+), differentiable: the Mosaic
    GPU forward with the measured-best launch (:func:`tuned_launch`) where it beats the portable Triton kernel,
    and the Mosaic GPU backward (:func:`seerjax.kernels.hopper_bwd.tuned_bwd_plan`) wherever it supports the
    call (block 64); the Triton kernels everywhere else — never an error or a wrong answer for a call the
    portable kernel accepts."""
    from seerjax.kernels import block_sparse as bsp
    from seerjax.kernels import hopper_bwd

    mask_heads = int(block_mask.shape[1])
    hplan = bplan = None
    if is_hopper_device() and hopper_supported(shape, mask_heads, q.dtype):
        launch = tuned_launch(shape, mask_heads, sm_count())
        if launch is not None:
            hplan = make_hopper_plan(shape, mask_heads, lengths is not None, **launch)
        if hopper_bwd.hopper_bwd_supported(shape, mask_heads, q.dtype):
            bplan = hopper_bwd.tuned_bwd_plan(shape, mask_heads, lengths is not None)
    if hplan is None and bplan is None:
        return bsp.block_sparse_attention_pallas(q, k, v, block_mask, shape, lengths=lengths, interpret=False)
    pplan = bsp.make_plan(block_mask, shape, lengths, q.dtype, interpret=False)
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    return _differentiable_jit(q, k, v, block_mask, lengths, hplan, pplan, bplan)


# --------------------------------------------------------------------------------------------------
# attention_with_pooling on Hopper: the forward over every visible block, plus per-row statistics
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("plan", "interpret"))
def _pooled_forward_jit(q, k, v, lengths, plan: HopperPlan, interpret=None):
    from seerjax.kernels import pooling

    sh = plan.shape
    every_block = jnp.ones((sh.batch, plan.mask_heads, sh.nq, sh.nk), bool)
    out_p, rowmax, lse2 = _forward_call(plan, *_prepare(q, k, v, every_block, lengths, sh, interpret), interpret)
    rowmax = rowmax[:, :, : sh.nk]  # (rowmax_batch: padded to whole stages)
    # The same epilogue as the portable one-pass path: pooled = max over a block's rows that see the key block
    # of exp2(rowmax - lse2); pairs no row sees (and blocks the kernel never visited) are masked there.
    tiles = pooling.Tiling(block_q=sh.block_size, block_k=sh.block_size, num_warps=4, num_stages=2)
    pooled = pooling._pool_rowmax(rowmax, lse2, lengths, sh, tiles)
    return out_p[:, : sh.q_len], pooled, lse2[:, :, : sh.q_len] * math.log(2.0)


def pooling_supported(shape: AttentionShape, dtype) -> bool:
    """Whether :func:`attention_with_pooling_hopper` handles this call (the forward's shapes, Mosaic GPU)."""
    return hopper_supported(shape, shape.kv_heads, dtype)


# Bytes of float32 row maxima per kernel call before the KV heads run in chunks (one GQA group per call at 128k: 257-261
# ms against 317 ms for the same chunks unrolled; smaller chunks were slower at 8k, eleventh session).
POOLED_ROWMAX_BUDGET = 4 * 2**30
POOLED_MIN_LEN = 8192  # shorter calls keep the portable kernel: the Mosaic GPU one was timed from 8k up


def tuned_pooled_launch(shape: AttentionShape) -> dict | None:
    """The pooled forward's launch measured fastest on an H100 (docs/kernel_notes.md, tenth session), or None
    where the portable one-pass kernel is the default: pairs, early K wait, no automatic barriers and, with two
    compute warpgroups, ping-pong between them (15.5–16.5 ms at 32k, against 18.2 ms without ping-pong and 19.0–19.2
    on a persistent grid, cuDNN 14.4–14.7; the portable kernel 19.0–19.4; at 8k 1.21–1.22 ms against the
    portable kernel's 1.33–1.35, cuDNN 1.06–1.13), for queries of at least POOLED_MIN_LEN tokens at block 64.
    (Before the row maxima were taken from static slices of the S tile, ping-pong was the slower one: 19.4–19.5
    against 17.6–18.3 ms, eighth session.) With the chunk loop and the banded epilogue, one bench run gave 1.03×,
    1.09× and 1.01× cuDNN's time at 8k, 32k and 128k (eleventh session). Storing the row maxima in stages
    (`rowmax_batch`) was no faster on this grid, so it is not in the launch."""
    if shape.q_len < POOLED_MIN_LEN or shape.block_size != 64:  # (dtype and head_dim: pooling_supported)
        return None
    consumers = 2 if shape.group % 2 == 0 else 1
    return dict(consumers=consumers, pingpong=consumers == 2, pair_blocks=True, early_wait=True, auto_barriers=False)


def attention_with_pooling_hopper(
    q, k, v, shape: AttentionShape, *, lengths=None, return_lse=False, interpret=None, launch: dict | None = None,
    rowmax_budget: int = POOLED_ROWMAX_BUDGET,
):
    """`attention_with_pooling` on Hopper (Pallas Mosaic GPU): the block-sparse forward over every visible block
    (one K/V stream per GQA pair of heads), writing each row's max scaled logit per key block and its log-sum-exp;
    one XLA reduction then pools them, as the portable one-pass path does. Not differentiable.

    The row-max buffer is float32 `[B, Hq, nk, T]`: 2 GiB at 32k tokens for Llama-3-8B's 32 heads, 32 GiB at 128k.
    Above `rowmax_budget` bytes the KV heads run in equal chunks (whole GQA groups: the most that fit and divide
    the KV heads, at least one), one kernel call each, one after another in a `lax.map` loop. `launch`:
    make_hopper_plan options (default: the first version's, two heads per CTA; `emit_stats` is implied).
    """
    if not pooling_supported(shape, q.dtype):
        raise ValueError(
            f"attention_with_pooling_hopper does not support dtype {jnp.dtype(q.dtype).name}, head_dim "
            f"{shape.head_dim}, block_size {shape.block_size}; expected dtype in {[t.name for t in SUPPORTED_DTYPES]}, "
            f"head_dim in {SUPPORTED_HEAD_DIMS}, block_size in {SUPPORTED_BLOCK_SIZES} (use the portable kernel)"
        )
    launch = dict(launch or {})
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    per_group = shape.batch * shape.group * shape.nk * shape.nq * shape.block_size * 4
    fit = max(1, min(shape.kv_heads, int(rowmax_budget) // per_group))
    groups = max(g for g in range(1, fit + 1) if shape.kv_heads % g == 0)  # KV heads per chunk: equal chunks
    sub = dataclasses.replace(shape, q_heads=groups * shape.group, kv_heads=groups)
    plan = make_hopper_plan(sub, groups, lengths is not None, emit_stats=True, **launch)
    n = shape.kv_heads // groups
    if n == 1:
        out, pooled, lse = _pooled_forward_jit(q, k, v, lengths, plan, interpret)
    else:
        # One chunk after another in a loop (`lax.map`): one chunk's row maxima alive at a time. Unrolled into n
        # calls in one program, the chunks took 317 ms at 128k (8 chunks) where 8 separate calls took 263 ms
        # (eleventh session, docs/kernel_notes.md).
        b, t, _, d = q.shape
        s = k.shape[1]
        chunks = lambda x, rows, heads: jnp.moveaxis(x.reshape(b, rows, n, heads, d), 2, 0)  # noqa: E731
        out, pooled, lse = lax.map(
            lambda qkv: _pooled_forward_jit(*qkv, lengths, plan, interpret),
            (chunks(q, t, groups * shape.group), chunks(k, s, groups), chunks(v, s, groups)),
        )
        out = jnp.moveaxis(out, 0, 2).reshape(b, t, shape.q_heads, d)
        pooled = jnp.moveaxis(pooled, 0, 1).reshape(b, shape.q_heads, *pooled.shape[3:])
        lse = jnp.moveaxis(lse, 0, 1).reshape(b, shape.q_heads, t)
    return (out, pooled, lse) if return_lse else (out, pooled)


def attention_with_pooling_sm90(q, k, v, shape: AttentionShape, *, lengths=None, return_lse=False):
    """The kernels dispatch's pooled `"hopper"` entry (and `implementation=None` on sm_90+): the Mosaic GPU pooled
    forward with :func:`tuned_pooled_launch` where that gives one (measured faster than the portable one-pass
    kernel), the portable Triton kernel otherwise. Neither is differentiable."""
    from seerjax.kernels import pooling

    launch = tuned_pooled_launch(shape) if is_hopper_device() and pooling_supported(shape, q.dtype) else None
    if launch is not None:
        return attention_with_pooling_hopper(q, k, v, shape, lengths=lengths, return_lse=return_lse, launch=launch)
    return pooling.attention_with_pooling_pallas(q, k, v, shape, lengths=lengths, return_lse=return_lse,
                                                 interpret=False)
