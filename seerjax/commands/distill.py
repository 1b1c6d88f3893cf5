"""`seerjax distill`: train AttnGates by self-distillation on a frozen model."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="SOURCE: .txt/.jsonl/.parquet file, directory, glob, 'embedded', or hub name")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per packed training sequence")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, gates.safetensors")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, cosine)")
    p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed for gate initialization and data order")
    p.add_argument("--block-size", type=int, default=64, choices=(16, 32, 64, 128), help="gate block size")
    p.add_argument("--gate-heads", default="query", choices=("query", "kv"), help="one gate per query head or per KV head")
    p.add_argument("--d-gate", type=int, default=128, help="gate hidden size")
    p.add_argument("--gate-type", default="Qavg_Kmaxminavg", help="poolings, e.g. Qavg_Kmaxminavg")
    p.add_argument("--q-sub-blocks", type=int, default=1,
                   help="score each query block as this many sub-blocks and keep the best (the target is a max over "
                        "the block's queries); must divide --block-size")
    p.add_argument("--k-sub-blocks", type=int, default=1, help="the same for key blocks")
    p.add_argument("--dtype", default="bfloat16", help="model compute dtype (bfloat16, float32, float16)")
    p.add_argument("--implementation", default=None, help="kernel implementation (default: fastest for the platform)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4,tensor=1 (default: one device)")
    p.add_argument("--retrieval-docs", type=int, default=0,
                   help="synthetic passkey / key-value / copy documents mixed into the data (haystacks from it)")
    p.add_argument("--skip-fraction", type=float, default=0.25,
                   help="share of the first query blocks left out of the loss (the seed's 0.25); at density 0.1 "
                        "those rows are still sparse at inference, so 0 trains the gate on them too")
    p.add_argument("--init-gates", default=None,
                   help="start from these trained gates (a gates directory with the same gate settings): a warm start "
                        "with a fresh optimizer and schedule, e.g. to distill further at a lower --lr")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args):
    from seerjax.train.distill import DistillSettings

    return DistillSettings(
        model=args.model,
        data=args.data,
        seq_len=args.seq_len,
        steps=args.steps,
        out=args.out,
        batch=args.batch,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        save_every=args.save_every,
        seed=args.seed,
        block_size=args.block_size,
        gate_heads=args.gate_heads,
        d_gate=args.d_gate,
        gate_type=args.gate_type,
        q_sub_blocks=args.q_sub_blocks,
        k_sub_blocks=args.k_sub_blocks,
        dtype=args.dtype,
        implementation=args.implementation,
        mesh=args.mesh,
        retrieval_docs=args.retrieval_docs,
        init_gates=args.init_gates,
        skip_fraction=args.skip_fraction,
        progress=not args.no_progress,
    )


def run(args) -> int:
    from seerjax.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from seerjax.train.distill import distill

    result = distill(settings_from_args(args))
    if result.losses:
        print(f"distilled gates for {result.steps} steps, final loss {result.final_loss:.5f}; "
              f"wrote {result.out}/gates.safetensors")
    else:  # resumed from a checkpoint already at the last step: nothing left to train
        print(f"the checkpoint in {result.out} is already at step {result.steps}; wrote {result.out}/gates.safetensors")
    return 0
