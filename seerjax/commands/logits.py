"""`seerjax logits`: load a Hugging Face checkpoint and print the model's next-token predictions for a text."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--text", default="The quick brown fox", help="prompt text")
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to print")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32, bfloat16, float16)")
    p.add_argument("--attention", default="reference", help="attention function (reference, cudnn, ...)")


def run(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from seerjax.hf import from_pretrained
    from seerjax.train.data import ByteTokenizer, load_tokenizer

    model = from_pretrained(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    ids = tok.encode(args.text) if isinstance(tok, ByteTokenizer) else list(tok(args.text)["input_ids"])
    if not ids:
        raise ValueError(f"--text {args.text!r} tokenizes to no tokens")
    logits = model(jnp.asarray([ids], jnp.int32), attention=args.attention, last_only=True)[0]
    probs = np.asarray(jax.nn.softmax(logits))
    top = np.argsort(-probs)[: args.top]
    c = model.config
    print(f"{c.model_type}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, "
          f"vocab {c.vocab_size}; {len(ids)} prompt tokens")
    print(f"logits: mean {float(logits.mean()):.4f}, std {float(logits.std()):.4f}, max {float(logits.max()):.4f}")
    for rank, i in enumerate(top, 1):
        print(f"{rank}. id {int(i):6d}  p={probs[i]:.4f}  {tok.decode([int(i)])!r}")
    return 0
