"""`seerjax demo`: the whole main job on the embedded default, offline.

pretrain a byte-level base model on the embedded corpus → distill its AttnGates → evaluate dense vs
SeerAttention vs the oracle and the training-free baselines at densities 0.5, 0.25 and 0.1 (perplexity,
attention-mass recall, passkey retrieval) → a table and plots in OUT/eval.

`--scale cpu` (default) fits about ten minutes on two CPU cores; `--scale gpu` is the study's recipe for one H100;
`--scale tiny` runs every stage in about a minute (for tests; no quality to read from it).
"""

from __future__ import annotations

import argparse
import os
import time

SCALES = {
    "cpu": dict(
        preset="mini", seq_len=512, pretrain_steps=140, pretrain_batch=6, pretrain_lr=4e-3, retrieval_docs=1500,
        distill_steps=300, distill_batch=2, distill_lr=5e-3, distill_retrieval_docs=250, block_size=16,
        d_gate=32, eval_sequences=4, retrieval_samples=2,
    ),
    # CI: the whole job in about a minute, to test the command itself (no quality).
    "tiny": dict(
        preset="tiny", seq_len=128, pretrain_steps=4, pretrain_batch=2, pretrain_lr=4e-3, retrieval_docs=12,
        distill_steps=2, distill_batch=1, distill_lr=5e-3, distill_retrieval_docs=2, block_size=16,
        d_gate=32, eval_sequences=1, retrieval_samples=1,
    ),
    # The study's recipe (eval/study.sh, docs/results.md): about 8 minutes of pretraining and 5 of distillation
    # on one H100.
    "gpu": dict(
        preset="small", seq_len=8192, pretrain_steps=5400, pretrain_batch=8, pretrain_lr=2e-3, retrieval_docs=12000,
        distill_steps=56000, distill_batch=1, distill_lr=1e-3, distill_retrieval_docs=4000, block_size=64,
        d_gate=128, gate_type="Qavgmax_Kmaxminavg", eval_sequences=16, retrieval_samples=4,
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (base/, gates/, eval/)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="cpu: minutes on 2 cores; gpu: the study recipe; tiny: a smoke test")
    p.add_argument("--densities", default="0.5,0.25,0.1", help="comma-separated densities to evaluate")
    p.add_argument("--gate-heads", default="query", choices=("query", "kv"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import jax

    from seerjax.eval.harness import EvalSettings, run_eval
    from seerjax.train.distill import DistillSettings, distill
    from seerjax.train.pretrain import PretrainSettings, pretrain

    cfg = SCALES[args.scale]
    try:
        densities = tuple(float(x) for x in args.densities.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--densities must be comma-separated numbers, got {args.densities!r}") from None
    progress = not args.no_progress
    on_gpu = jax.default_backend() == "gpu"
    implementation = None if on_gpu else "reference"
    dtype = "bfloat16" if on_gpu else "float32"
    t0 = time.perf_counter()
    print(f"[1/3] pretraining a {cfg['preset']} byte-level model on the embedded corpus ({cfg['pretrain_steps']} steps)")
    base = pretrain(
        PretrainSettings(
            out=os.path.join(args.out, "base"), preset=cfg["preset"], seq_len=cfg["seq_len"],
            steps=cfg["pretrain_steps"], batch=cfg["pretrain_batch"], lr=cfg["pretrain_lr"],
            retrieval_docs=cfg["retrieval_docs"], seed=args.seed, dtype="bfloat16" if on_gpu else "float32",
            progress=progress,
        )
    )
    print(f"      final loss {base['final_loss']:.3f} nats/byte, {time.perf_counter() - t0:.0f} s so far")
    print(f"[2/3] distilling AttnGates ({cfg['distill_steps']} steps, block {cfg['block_size']}, {args.gate_heads} heads)")
    gates_dir = os.path.join(args.out, "gates")
    result = distill(
        DistillSettings(
            model=base["model"], data="embedded:train", seq_len=cfg["seq_len"], steps=cfg["distill_steps"],
            out=gates_dir, batch=cfg["distill_batch"], block_size=cfg["block_size"], d_gate=cfg["d_gate"],
            gate_type=cfg.get("gate_type", DistillSettings.gate_type),
            gate_heads=args.gate_heads, lr=cfg["distill_lr"], warmup=max(2, cfg["distill_steps"] // 10),
            save_every=cfg["distill_steps"], retrieval_docs=cfg["distill_retrieval_docs"],
            seed=args.seed, dtype=dtype, implementation=implementation, progress=progress,
        )
    )
    print(f"      gate loss {result.losses[0]:.4f} → {result.final_loss:.4f}, {time.perf_counter() - t0:.0f} s so far")
    print(f"[3/3] evaluating dense, seer, oracle and the baselines at densities {list(densities)}")
    eval_dir = os.path.join(args.out, "eval")
    run_eval(
        EvalSettings(
            model=base["model"], gates=gates_dir, data="embedded:heldout", seq_len=cfg["seq_len"], out=eval_dir,
            densities=densities, num_sequences=cfg["eval_sequences"], retrieval_samples=cfg["retrieval_samples"],
            dtype=dtype, implementation=implementation, heldout_fraction=0.5, seed=args.seed, progress=progress,
            all_heldout=True,
        )
    )
    with open(os.path.join(eval_dir, "results.md")) as f:
        print(f.read())
    print(f"done in {time.perf_counter() - t0:.0f} s: {eval_dir}/results.json, results.md, ppl_vs_density.png, gate_vs_truth.png")
    return 0
