"""`seerjax convert`: load a Hugging Face checkpoint into seerjax and export it again (e.g. to another dtype)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--out", required=True, help="output directory (config.json + safetensors)")
    p.add_argument("--dtype", default="bfloat16", help="parameter dtype of the export (bfloat16, float16, float32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB")


def run(args) -> int:
    import jax
    from flax import nnx

    from seerjax.hf import copy_model_extras, from_pretrained, save_pretrained

    model = from_pretrained(args.model, dtype=args.dtype)
    save_pretrained(model, args.out, max_shard_size=args.max_shard_size)
    copy_model_extras(args.model, args.out)
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    print(f"converted {n:,} parameters to {args.dtype}: {args.out}")
    return 0
