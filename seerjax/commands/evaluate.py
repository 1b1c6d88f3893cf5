"""`seerjax eval`: perplexity, attention-mass recall and retrieval for every method × density."""

from __future__ import annotations

import argparse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--gates", default=None, help="gates directory (gates.safetensors + gate_config.json); needed for 'seer'")
    p.add_argument("--data", required=True, help="SOURCE of documents; the held-out split is evaluated")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per evaluated sequence")
    p.add_argument("--densities", type=_floats, default=(1.0, 0.5, 0.25, 0.1), help="comma-separated target densities")
    p.add_argument("--methods", type=_names, default=("seer", "oracle", "streaming", "vertical_slash", "quest", "moba"),
                   help="comma-separated: seer, oracle, oracle_kv (one mask per KV head), streaming, vertical_slash, quest, moba "
                        "(dense always runs)")
    p.add_argument("--thresholds", type=_floats, default=(), help="comma-separated softmax thresholds for 'seer'")
    p.add_argument("--keep-first", action="store_true",
                   help="every sparse method also keeps the first key block (the attention sink)")
    p.add_argument("--dense-last-rows", type=int, default=0,
                   help="every sparse method attends densely in the last N query blocks (default 0); with --densities, "
                        "their blocks come out of the same budget, so the achieved density stays the target")
    p.add_argument("--budget", default="uniform", choices=("uniform", "proportional"),
                   help="how TopK spreads a density over the query rows: the same k per row (uniform, the seed's "
                   "rule) or about `density` of each row's visible blocks (proportional)")
    p.add_argument("--num-sequences", type=int, default=8, help="held-out sequences for perplexity")
    p.add_argument("--recall-sequences", type=int, default=1,
                   help="of those, the first N also measure attention-mass recall and its ceiling (default 1; each "
                        "costs a forward pass per method and density)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--retrieval-lengths", type=_ints, default=(), help="passkey document lengths (default: --seq-len)")
    p.add_argument("--retrieval-depths", type=_floats, default=(0.1, 0.5, 0.9), help="passkey depths in [0, 1]")
    p.add_argument("--retrieval-samples", type=int, default=2, help="passkey documents per length and depth")
    p.add_argument("--block-size", type=int, default=64, help="block size of the baselines when no gates are given")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--implementation", default=None, help="kernel implementation (default: fastest for the platform)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=1,fsdp=1,tensor=2 (default: one device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory: results.json, results.md, plots")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from seerjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from seerjax.eval.harness import EvalSettings, run_eval

    settings = EvalSettings(
        model=args.model, gates=args.gates, data=args.data, seq_len=args.seq_len, out=args.out,
        densities=args.densities, methods=args.methods, thresholds=args.thresholds,
        keep_first=args.keep_first, dense_last_rows=args.dense_last_rows, budget=args.budget,
        num_sequences=args.num_sequences, recall_sequences=args.recall_sequences, batch=args.batch, retrieval_lengths=args.retrieval_lengths,
        retrieval_depths=args.retrieval_depths, retrieval_samples=args.retrieval_samples,
        block_size=args.block_size, dtype=args.dtype, implementation=args.implementation, mesh=args.mesh, seed=args.seed,
        progress=not args.no_progress,
    )
    records = run_eval(settings)
    with open(f"{args.out}/results.md") as f:
        print(f.read())
    print(f"wrote {args.out}/results.json ({len(records)} records)")
    return 0
