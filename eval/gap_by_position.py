"""Where a sparse method loses perplexity: its excess NLL over dense, by position in the sequence.

    python eval/gap_by_position.py --model DIR --gates GATES --density 0.1 --num-sequences 2 --json out.json

Runs dense, seer and the oracle on held-out sequences (`embedded:heldout` unless --data is given) and prints, for
position ranges, the mean excess NLL per token over dense and each range's share of seer's total excess. The first
`skip_fraction` of query blocks is left out of the distillation loss, so a large share there points at it.
"""

from __future__ import annotations

import argparse
import json
import types

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--gates", required=True)
    p.add_argument("--data", default="embedded:heldout")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--num-sequences", type=int, default=2)
    p.add_argument("--edges", default="0,384,1024,2048,4096", help="start of each position range (the last runs to the end)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--implementation", default=None)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    edges = [int(x) for x in a.edges.split(",")] + [a.seq_len]
    if edges != sorted(edges) or edges[0] != 0 or len(set(edges)) != len(edges):
        p.error(f"--edges must rise strictly from 0 and stay below --seq-len={a.seq_len}, got {a.edges!r}")

    import jax
    import jax.numpy as jnp

    from seerjax import sparse_attention  # noqa: F401  (registers the methods)
    from seerjax.eval.harness import _dense_name, _heldout_sequences
    from seerjax.gates_io import load_gates
    from seerjax.hf import from_pretrained
    from seerjax.train.data import load_texts, load_tokenizer, tokenize_documents

    model = from_pretrained(a.model, dtype=a.dtype)
    tok = load_tokenizer(a.model)
    block = load_gates(model, a.gates).block_size
    docs = tokenize_documents(load_texts(a.data), tok)
    seqs = _heldout_sequences(docs, a.seq_len, a.num_sequences, int(getattr(tok, "eos_token_id", 0) or 0))
    dense = _dense_name(types.SimpleNamespace(dtype=a.dtype, implementation=a.implementation))
    sparse = {"density": a.density, "implementation": a.implementation, "block_size": block}

    def nll(ids, attention, options):
        logits, _ = model.forward(ids, attention=attention, attention_config=options)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

    run = {name: jax.jit(lambda ids, n=name, o=opts: nll(ids, n, o))
           for name, opts in ((dense, {"implementation": a.implementation}), ("seer", sparse), ("oracle", sparse))}
    res = {name: np.concatenate([np.asarray(fn(jnp.asarray(s)[None]))[0] for s in seqs]) for name, fn in run.items()}
    pos = np.tile(np.arange(a.seq_len - 1) + 1, len(seqs))  # position of the predicted token
    report = {"ppl": {k: float(np.exp(v.mean())) for k, v in res.items()}, "ranges": []}
    total = float((res["seer"] - res[dense]).sum())
    print(f"PPL: dense {report['ppl'][dense]:.4f}, seer {report['ppl']['seer']:.4f}, oracle {report['ppl']['oracle']:.4f}")
    print("| positions | seer excess NLL / token | oracle excess NLL / token | share of seer's excess |")
    print("|---|---|---|---|")
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (pos >= lo) & (pos < hi)
        seer, oracle = (res["seer"][m] - res[dense][m]), (res["oracle"][m] - res[dense][m])
        row = {"from": lo, "to": hi, "seer": float(seer.mean()), "oracle": float(oracle.mean()),
               "share": float(seer.sum() / total) if total else float("nan")}
        report["ranges"].append(row)
        print(f"| {lo}–{hi - 1} | {row['seer']:.4f} | {row['oracle']:.4f} | {row['share']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
