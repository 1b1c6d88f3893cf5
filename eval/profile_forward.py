"""Profile the Mosaic GPU block-sparse forward with Nsight Compute (GPU), and summarize the profile (anywhere).

``run`` calls the forward (Llama-3-8B attention shape, bf16, causal, per-KV-head masks of k blocks per row, the
dispatch's tuned launch or ``--launch``) twice, so that ``ncu --launch-skip 1`` profiles a warm call; with
``--pooled``, the pooled forward (every visible block, row maxima out) instead. ``summarize`` reads ncu's
source page exported as CSV and prints where the warps' stall samples sit: by SASS opcode, per execution-count
class (instructions run once per loop step, once per work item, rarely; the producer warpgroup's code apart) and the
top instructions with their main stall reasons.

    ncu --kernel-name entry_mosaic_gpu_kernel --launch-skip 1 --launch-count 1 --section WarpStateStats \\
        --section SourceCounters -o /tmp/prof python eval/profile_forward.py run --length 32768 --blocks 16
    ncu --import /tmp/prof.ncu-rep --page source --print-source sass --csv > /tmp/sass.csv
    python eval/profile_forward.py summarize /tmp/sass.csv --steps-per-item 7.9
"""

from __future__ import annotations

import argparse
import collections
import csv
import pathlib
import sys


def run(length: int, blocks: int, launch: str | None = None, pooled: bool = False) -> None:
    import jax

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    import tune_kernels as tk
    from seerjax.kernels.checks import check_attention_inputs
    from seerjax.kernels import hopper

    q, k, v = tk._inputs(length)
    shape = check_attention_inputs(q, k, v, causal=True, block_size=tk.BS, sm_scale=None, lengths=None)
    if pooled:
        opts = tk.parse_launches(launch)[0] if launch else hopper.tuned_pooled_launch(shape)
        fn = jax.jit(lambda q, k, v: hopper.attention_with_pooling_hopper(q, k, v, shape, launch=opts))
        args = (q, k, v)
    else:
        opts = tk.parse_launches(launch)[0] if launch else hopper.tuned_launch(shape, tk.HKV, hopper.sm_count())
        fn = jax.jit(lambda q, k, v, m: hopper.block_sparse_attention_hopper(q, k, v, m, shape, **opts))
        args = (q, k, v, tk.rows_of_k_blocks(5, tk.HKV, length // tk.BS, blocks))
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    print(f"{'pooled' if pooled else 'sparse'} forward, launch: {opts}")


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def read_source_csv(path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of ncu's `--page source --csv` export: the table whose header has a `Source` column."""
    lines = pathlib.Path(path).read_text().splitlines()
    rows = list(csv.reader(line for line in lines if line.startswith('"')))
    try:
        head = next(i for i, r in enumerate(rows) if any(c.strip() == "Source" for c in r))
    except StopIteration:
        raise SystemExit(f"{path}: no table with a 'Source' column (expected ncu --page source --csv output)") from None
    return rows[head], rows[head + 1:]


def summarize(path, steps_per_item: float, top: int = 25) -> dict:
    """The stall-sample summary (printed, and returned as a dict)."""
    header, rows = read_source_csv(path)
    col = {name.strip(): i for i, name in enumerate(header)}
    for name in ("Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"):
        if name not in col:
            raise SystemExit(f"{path}: column {name!r} missing; have {sorted(col)[:12]}...")
    src, samples, executed = col["Source"], col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
    stall_cols = [i for i, h in enumerate(header) if h.startswith("stall_") and "(Not Issued)" not in h]
    # The producer warpgroup's code follows its register release (setmaxnreg.dealloc).
    producer = next((i for i, r in enumerate(rows) if "USETMAXREG.DEALLOC" in r[src]), len(rows))
    consumer = rows[:producer]
    total = sum(_number(r[samples]) for r in consumer) or 1.0
    per_item = max((_number(r[executed]) for r in consumer), default=0.0) / max(steps_per_item, 1.0)

    def opcode(text: str) -> str:
        words = text.split()
        words = words[1:] if words and words[0].startswith("@") else words
        return words[0].split(".")[0] if words else "?"

    def kind(count: float) -> str:
        if count > 1.5 * per_item:
            return "per step"
        return "per item" if count > 0.4 * per_item else "rare"

    by_kind, by_op = collections.Counter(), collections.Counter()
    for r in consumer:
        by_kind[kind(_number(r[executed]))] += _number(r[samples]) / total
        by_op[opcode(r[src])] += _number(r[samples]) / total
    spills = sum(1 for r in rows if opcode(r[src]) in ("LDL", "STL"))  # local memory: register spills
    out = {"consumer_samples": total, "by_kind": dict(by_kind), "by_opcode": dict(by_op.most_common(15)), "top": [],
           "local_memory_instructions": spills}
    print(f"consumer warps: {total:.0f} samples; " + ", ".join(f"{k} {v:.1%}" for k, v in by_kind.most_common()))
    print(f"local-memory (spill) instructions in the kernel: {spills}")
    print("by opcode: " + ", ".join(f"{k} {v:.1%}" for k, v in by_op.most_common(15)))
    for i in sorted(range(len(consumer)), key=lambda i: -_number(consumer[i][samples]))[:top]:
        r = consumer[i]
        reasons = sorted(((_number(r[c]), header[c]) for c in stall_cols), reverse=True)[:2]
        share = _number(r[samples]) / total
        out["top"].append({"index": i, "share": share, "sass": r[src].strip(), "executed": _number(r[executed]),
                           "reasons": {h: v for v, h in reasons if v}})
        print(f"{i:5d} {share:6.2%} {kind(_number(r[executed])):8s} {r[src].strip()[:64]:64s} "
              + " ".join(f"{h}={v:.0f}" for v, h in reasons if v))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="call the forward twice (GPU), for ncu")
    r.add_argument("--length", type=int, default=32768)
    r.add_argument("--blocks", type=int, default=16, help="blocks per row (the diagonal and k - 1 earlier ones)")
    r.add_argument("--launch", default=None, help="one launch in tune_kernels.py's tokens, e.g. c2-fast-pp-pers132")
    r.add_argument("--pooled", action="store_true", help="the pooled forward (every visible block) instead")
    s = sub.add_parser("summarize", help="summarize ncu's source page (CSV)")
    s.add_argument("csv")
    s.add_argument("--steps-per-item", type=float, default=1.0,
                   help="mean loop steps per work item, to tell per-step from per-item instructions")
    s.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.length % 64 or args.length <= 0 or args.blocks < 1:
            p.error(f"--length must be a positive multiple of 64 and --blocks >= 1; got {args.length}, {args.blocks}")
        run(args.length, args.blocks, args.launch, args.pooled)
    else:
        summarize(args.csv, args.steps_per_item, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
