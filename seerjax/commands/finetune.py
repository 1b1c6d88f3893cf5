"""`seerjax finetune`: long-context fine-tuning (YaRN) with block-sparse attention, sharded over a device mesh."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--gates", required=True, help="gates directory (gates.safetensors + gate_config.json, e.g. from distill)")
    p.add_argument("--data", required=True, help="SOURCE: .txt/.jsonl/.parquet file, directory, glob, 'embedded', or hub name")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per packed training sequence")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, the fine-tuned model and gates")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=2,fsdp=4,tensor=1 (axes left out are 1; one may be -1: the rest); "
                        "default: one device")
    p.add_argument("--batch", type=int, default=1, help="global sequences per micro-batch, split over data×fsdp")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of the model (AdamW, warm-up, cosine)")
    p.add_argument("--gate-lr", type=float, default=1e-3, help="peak learning rate of the gates")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the model")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip of the model (0: none)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order")
    p.add_argument("--density", type=float, default=0.1, help="TopK block density of the sparse attention")
    p.add_argument("--attention", default="seer", choices=("seer", "dense"),
                   help="seer: gate-selected block-sparse attention; dense: dense baseline (gates still trained)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="compute dtype (parameters and optimizer state are float32)")
    p.add_argument("--implementation", default=None, help="kernel implementation (default: fastest for the platform)")
    p.add_argument("--remat", default="full",
                   choices=("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable"),
                   help="activation checkpointing policy of each decoder layer")
    p.add_argument("--rope-scaling", default="none", choices=("none", "yarn"), help="re-configure RoPE (yarn)")
    p.add_argument("--rope-factor", type=float, default=None, help="YaRN context extension factor")
    p.add_argument("--gate-loss-scale", type=float, default=10.0, help="weight of the gate distillation loss (0: off)")
    p.add_argument("--loss-chunk", type=int, default=2048, help="positions per LM-loss chunk (0: whole sequence)")
    p.add_argument("--export-dtype", default=None, choices=("bfloat16", "float32", "float16"),
                   help="dtype of the exported model (default: the dtype of --model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args):
    from seerjax.train.finetune import FinetuneSettings

    return FinetuneSettings(
        model=args.model, gates=args.gates, data=args.data, seq_len=args.seq_len, steps=args.steps, out=args.out,
        batch=args.batch, grad_accum=args.grad_accum, lr=args.lr, gate_lr=args.gate_lr, warmup=args.warmup,
        weight_decay=args.weight_decay, clip=args.clip, save_every=args.save_every, seed=args.seed,
        density=args.density, attention=args.attention, dtype=args.dtype, implementation=args.implementation,
        remat=args.remat, rope_scaling=args.rope_scaling, rope_factor=args.rope_factor, mesh=args.mesh,
        gate_loss_scale=args.gate_loss_scale, loss_chunk=args.loss_chunk, export_dtype=args.export_dtype,
        progress=not args.no_progress,
    )


def run(args) -> int:
    from seerjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from seerjax.train.finetune import finetune

    result = finetune(settings_from_args(args))
    print(
        f"fine-tuned for {result.steps} steps on mesh {result.mesh}, final loss {result.final_loss:.5f}; "
        f"wrote the model and gates to {result.out}"
    )
    return 0
