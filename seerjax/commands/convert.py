"""`seerjax convert`: load a Hugging Face checkpoint into seerjax and export it again (e.g. to another dtype)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (config.json + safetensors)")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype of the export (bfloat16, float16, float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB")


def run(args) -> int:
    import os
    import shutil

    import jax
    from flax import nnx

    from seerjax.hf import copy_seerjax_config_keys, from_pretrained, save_pretrained

    model = from_pretrained(args.model, dtype=args.dtype)
    save_pretrained(model, args.out, max_shard_size=args.max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "generation_config.json"):
        src = os.path.join(args.model, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out, name))
    copy_seerjax_config_keys(args.model, args.out)  # e.g. the byte-level tokenizer marker
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"converted {n:,} parameters to {args.dtype}: {args.out}")
    return 0
