"""`seerjax pretrain`: train a small byte-level Llama-architecture base model from scratch."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, model/ (HF format)")
    p.add_argument("--preset", default="mini", choices=("tiny", "mini", "small"), help="model size (mini: CPU, small: GPU)")
    p.add_argument("--data", default="embedded", help="SOURCE of training documents (default: the embedded corpus)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="compute dtype; parameters and optimizer state stay float32")
    p.add_argument("--retrieval-docs", type=int, default=2000, help="synthetic passkey / key-value documents mixed in")
    p.add_argument("--retrieval-min-fraction", type=float, default=0.125,
                   help="synthetic documents are this fraction of --seq-len to all of it (uniform); larger puts more "
                        "needles far from their question")
    p.add_argument("--passkey-min-fraction", type=float, default=None,
                   help="the passkey documents' own shortest length, as a fraction of --seq-len (default: "
                        "--retrieval-min-fraction); 1.0 spreads needle distances evenly up to --seq-len")
    p.add_argument("--rope-theta", type=float, default=10000.0,
                   help="RoPE base wavelength (Llama 2: 10000; Llama 3: 500000, kinder to retrieval over long distances)")
    p.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR[:ORIGINAL]",
                   help="RoPE context extension for a longer stage after --init-model: TYPE linear, llama3 or yarn, "
                        "FACTOR the length ratio, ORIGINAL the starting model's context (default --seq-len / FACTOR); "
                        "e.g. llama3:2 from 8k to 16k (Llama 3.1's scaling)")
    p.add_argument("--attention", default=None, help="attention function (default: cudnn on GPU, reference on CPU)")
    p.add_argument("--init-model", default=None,
                   help="start from this model (HF directory of the same preset, e.g. OUT/model of a pretrain at a "
                        "shorter length) instead of random parameters; the optimizer and schedule start fresh")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from seerjax.train.pretrain import PretrainSettings, pretrain

    s = PretrainSettings(
        out=args.out, preset=args.preset, data=args.data, seq_len=args.seq_len, steps=args.steps, batch=args.batch,
        lr=args.lr, warmup=args.warmup, save_every=args.save_every, seed=args.seed, dtype=args.dtype,
        retrieval_docs=args.retrieval_docs, retrieval_min_fraction=args.retrieval_min_fraction,
        passkey_min_fraction=args.passkey_min_fraction,
        rope_theta=args.rope_theta, rope_scaling=args.rope_scaling, attention=args.attention, progress=not args.no_progress, init_model=args.init_model,
    )
    summary = pretrain(s)
    print(f"pretrained {summary['params']:,} parameters for {summary['steps']} steps in {summary['seconds']:.0f} s, "
          f"final loss {summary['final_loss']:.3f}; model in {summary['model']}")
    return 0
