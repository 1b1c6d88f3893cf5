"""Checkpoint directory and metrics file handling shared by pretraining, distillation and fine-tuning."""

from __future__ import annotations

import json
import os

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"


def checkpoint_manager(out: str):
    """Synchronous orbax manager under `OUT/checkpoints`, keeping the last two steps (a kill mid-save leaves
    the previous checkpoint intact)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out, CHECKPOINT_DIR)), options=options)


def rewrite_metrics(path: str, upto_step: int) -> None:
    """Keeps the metric lines of steps <= upto_step (a resumed run rewrites the later ones)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= upto_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from a killed run
    with open(path, "w") as f:
        f.writelines(kept)
