"""The evaluation harness: every method × density on the same held-out data, apples to apples.

For each (method, density) it measures
  * perplexity over held-out sequences of `seq_len` tokens;
  * attention-mass recall: the share of the true attention probability mass (dense softmax) that falls
    inside the selected blocks, averaged over layers, heads and query rows;
  * retrieval accuracy: passkey documents at several lengths and depths, scored by teacher-forced greedy
    decoding of the answer (all answer tokens must be the argmax), two ways: ``retrieval`` with every row
    through the method (the answer's rows sparse too), and ``retrieval_prefill`` as a served request runs
    (SeerAttention's setting): the prompt prefilled through the method, the answer's later tokens decoded
    densely over that KV cache (``decode_tokens``);
  * the achieved density (selected share of the causal block triangle), per layer and head, averaged;
  * for each density, the recall ceiling: the recall of the blocks with the most true attention mass under the
    same per-row budget (the recall-maximizing selection; the oracle picks by max-pooled attention instead).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("dense", "seer", "oracle", "oracle_kv", "streaming", "vertical_slash", "quest", "moba")


class EvalError(ValueError):
    """Bad evaluation settings."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    model: str
    gates: str | None
    data: str
    seq_len: int
    out: str
    densities: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    methods: tuple[str, ...] = ("seer", "oracle", "streaming", "vertical_slash", "quest", "moba")
    thresholds: tuple[float, ...] = ()
    keep_first: bool = False  # every sparse method also keeps the first key block (the attention sink)
    dense_last_rows: int = 0  # ... and attends densely in the last this many query blocks (within the budget)
    budget: str = "uniform"  # how TopK spreads each density over the query rows (seerjax.selection.BUDGETS)
    num_sequences: int = 8
    batch: int = 1
    retrieval_lengths: tuple[int, ...] = ()
    retrieval_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    retrieval_samples: int = 2
    recall_sequences: int = 1
    block_size: int = 64
    dtype: str = "bfloat16"
    implementation: str | None = None
    mesh: str | None = None  # device mesh, e.g. "data=2,fsdp=2,tensor=2"; None: one device
    heldout_fraction: float = 0.1
    all_heldout: bool = False  # the data source is already held out: evaluate all of it
    seed: int = 0
    plot_layer: int = 0
    plot_head: int = 0
    progress: bool = True

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise EvalError(f"unknown methods {unknown}; expected names from {list(METHODS)}")
        if not self.methods:
            raise EvalError("methods must name at least one method")
        for d in self.densities:
            if not 0.0 < d <= 1.0:
                raise EvalError(f"densities must be in (0, 1], got {d}")
        for t in self.thresholds:
            if not 0.0 <= t < 1.0:
                raise EvalError(f"thresholds must be in [0, 1), got {t}")
        if self.dense_last_rows < 0:
            raise EvalError(f"dense_last_rows must be >= 0, got {self.dense_last_rows}")
        from seerjax.selection import BUDGETS

        if self.budget not in BUDGETS:
            raise EvalError(f"budget must be one of {list(BUDGETS)}, got {self.budget!r}")
        for name in ("seq_len", "num_sequences", "batch", "retrieval_samples", "recall_sequences"):
            if getattr(self, name) < 1:
                raise EvalError(f"{name} must be positive, got {getattr(self, name)}")
        if self.recall_sequences > self.num_sequences:
            raise EvalError(f"recall_sequences={self.recall_sequences} exceeds num_sequences={self.num_sequences}: recall "
                            f"is measured on the first of the evaluated sequences")
        if self.seq_len < self.block_size:
            raise EvalError(f"seq_len={self.seq_len} is shorter than one block (block_size={self.block_size})")
        if "seer" in self.methods and not self.gates:
            raise EvalError("method 'seer' needs --gates DIR (a directory with gates.safetensors and gate_config.json)")


# -- measurements -------------------------------------------------------------------------------------


def block_attention_mass(q, k, *, causal, block_size, sm_scale, lengths=None) -> jax.Array:
    """True attention mass per block, float32 `[B, Hq, nq, nk]`: for each query block, the mean over its
    (valid) rows of the probability summed over the keys of each key block. Rows sum to 1 over key blocks.

    Computed one query block at a time (`lax.map`) so memory stays `[B, Hq, block, S]`.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    nq, nk = -(-t // block_size), -(-s // block_size)
    qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, nq * block_size - t), (0, 0), (0, 0)))
    qp = qp.reshape(b, nq, block_size, hkv, hq // hkv, d).transpose(1, 0, 2, 3, 4, 5)
    kf = k.astype(jnp.float32)
    s_idx = jnp.arange(s)
    limit = jnp.full((b,), s) if lengths is None else lengths.astype(jnp.int32)

    def one(args):
        i, q_blk = args  # q_blk [B, bs, Hkv, G, D]
        t_idx = i * block_size + jnp.arange(block_size)
        logits = jnp.einsum("btkgd,bskd->bkgts", q_blk, kf, precision=jax.lax.Precision.HIGHEST) * sm_scale
        vis = jnp.ones((block_size, s), bool)
        if causal:
            vis = s_idx[None, :] <= t_idx[:, None] + (s - t)
        row_ok = (t_idx[None, :] < jnp.minimum(limit, t)[:, None])  # [B, bs]
        vis = vis[None] & (s_idx[None, None, :] < limit[:, None, None]) & row_ok[:, :, None]  # [B, bs, S]
        logits = jnp.where(vis[:, None, None], logits, -1e30)
        p = jax.nn.softmax(logits, axis=-1) * vis[:, None, None]
        p = jnp.pad(p, ((0, 0),) * 4 + ((0, nk * block_size - s),))
        mass = p.reshape(*p.shape[:-1], nk, block_size).sum(-1)  # [B, Hkv, G, bs, nk]
        rows = jnp.maximum(row_ok.sum(-1), 1)[:, None, None, None]
        return mass.sum(3) / rows  # [B, Hkv, G, nk]

    out = jax.lax.map(one, (jnp.arange(nq), qp))  # [nq, B, Hkv, G, nk]
    return out.transpose(1, 2, 3, 0, 4).reshape(b, hq, nq, nk)


def mass_recall(mask_bhij, mass_bhij) -> jax.Array:
    """Share of the attention mass inside the selected blocks (mask per query or per KV head)."""
    hq, hm = mass_bhij.shape[1], mask_bhij.shape[1]
    if hm != hq:
        mask_bhij = jnp.repeat(mask_bhij, hq // hm, axis=1)
    return jnp.sum(jnp.where(mask_bhij, mass_bhij, 0.0)) / jnp.maximum(jnp.sum(mass_bhij), 1e-30)


PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


def passkey_sample(tokenizer, length: int, depth: float, rng: np.random.Generator, filler_ids=None):
    """A passkey document of exactly `length` tokens: (input_ids, answer_positions, answer_ids).

    The key sentence sits at `depth` (0 = start, 1 = end) of the filler; the document ends with the question
    and the answer digits, whose tokens are checked with teacher forcing.
    """
    key = int(rng.integers(10000, 99999))
    enc = (lambda text: _encode(tokenizer, text))
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" What is the pass key? The pass key is")
    answer = enc(f" {key}")
    filler = list(filler_ids) if filler_ids is not None else enc(PASSKEY_FILLER)
    budget = length - len(needle) - len(question) - len(answer)
    if budget < 1:
        raise EvalError(f"retrieval length {length} is too short for a passkey document (needs > {length - budget + 1} tokens)")
    reps = -(-budget // max(len(filler), 1))
    hay = (filler * reps)[:budget]
    at = int(round(depth * budget))
    ids = hay[:at] + needle + hay[at:] + question + answer
    start = len(ids) - len(answer)
    return np.asarray(ids, np.int32), np.arange(start, len(ids)), np.asarray(answer, np.int32)


def _encode(tokenizer, text: str) -> list[int]:
    from seerjax.train.data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


# -- running the grid ----------------------------------------------------------------------------------


def _grid(s: EvalSettings) -> list[tuple[str, float | None, float | None]]:
    """(method, density, threshold) records; dense once at density 1.0."""
    grid = [("dense", 1.0, None)]
    for m in s.methods:
        if m == "dense":
            continue
        grid += [(m, d, None) for d in s.densities]
        if m == "seer":
            grid += [(m, None, t) for t in s.thresholds]
    return grid


def run_eval(s: EvalSettings, *, model=None, heldout=None, tokenizer=None) -> list[dict]:
    """Evaluates the grid; writes OUT/results.json, OUT/results.md and plots. Returns the records."""
    from seerjax import sparse_attention  # noqa: F401  (registers the attention functions)
    from seerjax.gates_io import load_gates
    from seerjax.train.data import load_texts, load_tokenizer, split_documents, tokenize_documents

    if model is None:
        from seerjax.hf import from_pretrained

        model = from_pretrained(s.model, dtype=s.dtype)
    if tokenizer is None:
        tokenizer = load_tokenizer(s.model)
    block_size = s.block_size
    if s.gates:
        gate_config = load_gates(model, s.gates)
        block_size = gate_config.block_size
    if s.mesh:
        from flax import nnx

        from seerjax.sharding import make_mesh, put_tree, tree_shardings

        state = nnx.state(model)
        nnx.update(model, put_tree(state, tree_shardings(state, make_mesh(s.mesh))))
    if heldout is None:
        docs = tokenize_documents(load_texts(s.data), tokenizer)
        already_heldout = s.all_heldout or s.data == "embedded:heldout"
        if not already_heldout and len(docs) > 1:
            docs = split_documents(docs, s.heldout_fraction, seed=s.seed)[1]
        heldout = docs
    sequences = _heldout_sequences(heldout, s.seq_len, s.num_sequences, int(getattr(tokenizer, "eos_token_id", 0) or 0))
    rng = np.random.default_rng(s.seed)
    filler = max(heldout, key=len)  # real held-out text as the haystack
    retrieval = [  # (input_ids, answer_positions, answer_ids, depth)
        (*passkey_sample(tokenizer, L, depth, rng, filler_ids=filler), depth)
        for L in (s.retrieval_lengths or (s.seq_len,))
        for depth in s.retrieval_depths
        for _ in range(s.retrieval_samples)
    ]

    grid = _grid(s)
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), desc="eval", unit="setting", dynamic_ncols=True)
    records = []
    ceilings = {}  # density -> recall ceiling: the same for every method (the other selection options are the run's)
    os.makedirs(s.out, exist_ok=True)
    for method, density, threshold in grid:
        options = {"block_size": block_size, "implementation": s.implementation}
        if method != "dense":
            options.update(keep_first=s.keep_first, dense_last_rows=s.dense_last_rows, budget=s.budget)
        if threshold is not None:
            options["threshold"] = threshold
        else:
            options["density"] = density
        attention, options = _on_mesh(s, _dense_name(s) if method == "dense" else method, options)
        rec = _evaluate_setting(model, attention, options, sequences, retrieval, s, block_size)
        rec.update(method=method, density=density, threshold=threshold)
        if method != "dense" and threshold is None:
            if density not in ceilings:
                ceilings[density] = recall_ceiling(model, options, sequences[: s.recall_sequences], block_size)
            rec["recall_ceiling"] = ceilings[density]
        records.append(rec)
        if bar is not None:
            bar.set_postfix(method=method, density=density if threshold is None else f"thr {threshold}", ppl=f"{rec['ppl']:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    write_results(s.out, records)
    try:
        plot_results(s.out, records)
        if s.gates:
            plot_gate_map(s.out, model, sequences[0][None], s, block_size)
    except ImportError:
        pass
    return records


def _on_mesh(s: EvalSettings, attention: str, options: dict) -> tuple[str, dict]:
    """With a mesh: the per-device (shard_map) version of the attention function, the mesh in its options."""
    if not s.mesh:
        return attention, options
    from seerjax.sharding import make_mesh, sharded_attention

    return sharded_attention(attention), {**options, "mesh": make_mesh(s.mesh)}


def _dense_name(s: EvalSettings) -> str:
    if s.implementation == "reference" or jax.default_backend() == "cpu":
        return "reference"
    return "cudnn" if jnp.dtype(s.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "reference"


def _heldout_sequences(docs, seq_len, n, eos) -> np.ndarray:
    """Up to n non-overlapping `seq_len` windows of held-out documents, long documents first."""
    docs = sorted(docs, key=len, reverse=True)
    out = []
    for d in docs:
        for start in range(0, len(d) - seq_len + 1, seq_len):
            out.append(d[start : start + seq_len])
            if len(out) == n:
                return np.stack(out)
    if not out:
        # No document is long enough: pack held-out documents with EOS between them.
        stream = np.concatenate([np.append(d, eos) for d in docs])
        if len(stream) < seq_len:
            raise EvalError(f"the held-out data holds {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}")
        out = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:n]
    return np.stack(out)


def _evaluate_setting(model, attention, options, sequences, retrieval, s: EvalSettings, block_size) -> dict:
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def nll_and_aux(state, ids):
        m = nnx.merge(graphdef, state)
        logits, aux = m.forward(ids, attention=attention, attention_config=options)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        dens = [a["density"].mean() for a in aux if "density" in a]
        return nll.sum(), nll.size, jnp.stack(dens) if dens else jnp.ones((1,)), logits.argmax(-1)

    @functools.lru_cache(maxsize=None)
    def argmax_decoding_dense(n: int):
        """Greedy predictions with the last n rows dense: a sparse prefill of the prompt, then dense decoding."""

        @jax.jit
        def fn(state, ids):
            m = nnx.merge(graphdef, state)
            logits, _ = m.forward(ids, attention=attention, attention_config={**options, "decode_tokens": n})
            return logits.argmax(-1)

        return fn

    total, count, densities = 0.0, 0, []
    for i in range(0, len(sequences), s.batch):
        ids = jnp.asarray(sequences[i : i + s.batch])
        nll, n, dens, _ = nll_and_aux(state, ids)
        total += float(nll)
        count += int(n)
        densities.append(np.asarray(dens))
    # Per protocol, per (document length, needle depth): (hits, documents).
    tallies: dict[str, dict[tuple[int, float], tuple[int, int]]] = {"retrieval": {}, "retrieval_prefill": {}}
    sparse = "density" in options or "threshold" in options  # dense attention: both protocols are the same run
    for ids, pos, answer, depth in retrieval:
        x = jnp.asarray(ids)[None]
        pred = np.asarray(nll_and_aux(state, x)[3])[0]
        ok = {"retrieval": int(np.all(pred[pos - 1] == answer))}
        # The same document as served: the prompt (up to the answer's first token, predicted by the prompt's
        # last row) prefilled with the method, the answer's later tokens decoded densely over that cache.
        if sparse:
            pred = np.asarray(argmax_decoding_dense(len(answer) - 1)(state, x))[0]
            ok["retrieval_prefill"] = int(np.all(pred[pos - 1] == answer))
        else:
            ok["retrieval_prefill"] = ok["retrieval"]
        for name, hit in ok.items():
            hits, n = tallies[name].get((len(ids), depth), (0, 0))
            tallies[name][(len(ids), depth)] = (hits + hit, n + 1)
    record = {
        "ppl": float(math.exp(total / count)),
        "achieved_density": float(np.mean(densities)),
        "recall": _recall(model, attention, options, sequences[: s.recall_sequences], block_size),
    }
    for name, cells in tallies.items():
        record[name] = sum(h for h, _ in cells.values()) / max(len(retrieval), 1)
        for label, key in (("length", lambda c: str(c[0])), ("depth", lambda c: str(c[1])),
                           ("length_depth", lambda c: f"{c[0]}@{c[1]}")):
            groups: dict[str, list[int]] = {}
            for cell, (h, n) in sorted(cells.items()):
                g = groups.setdefault(key(cell), [0, 0])
                g[0] += h
                g[1] += n
            record[f"{name}_by_{label}"] = {k: h / n for k, (h, n) in groups.items()}
    return record


def recall_ceiling(model, options, sequences, block_size) -> float:
    """The best recall any selection reaches under these selection options: each row's blocks picked by their
    true attention mass (per query head), with the same TopK budget, diagonal and options as every method."""
    from seerjax.attention import register_attention
    from seerjax.sparse_attention import _sparse

    def by_mass(inputs):
        mass = block_attention_mass(
            inputs.q, inputs.k, causal=inputs.causal, block_size=block_size, sm_scale=inputs.sm_scale, lengths=inputs.lengths
        )
        return _sparse(inputs, mass, block_size)

    register_attention("_by_mass", by_mass, overwrite=True)
    options = {k: v for k, v in options.items() if k != "mesh"}
    return _recall(model, "_by_mass", options, sequences, block_size)


def _recall(model, attention, options, sequences, block_size) -> float:
    """Mean over layers of the attention-mass recall of the method's masks on these sequences."""
    from flax import nnx

    from seerjax.attention import AttentionOutputs, get_attention, register_attention

    inner = get_attention(attention)
    name = f"_recall_{attention}"

    def measured(inputs):
        result = inner(dataclasses.replace(inputs, config={**inputs.config, "return_mask": True}))
        mass = block_attention_mass(
            inputs.q, inputs.k, causal=inputs.causal, block_size=block_size, sm_scale=inputs.sm_scale, lengths=inputs.lengths
        )
        mask = result.aux.get("mask")
        recall = jnp.asarray(1.0) if mask is None else mass_recall(mask, mass)
        return AttentionOutputs(result.out, {"recall": recall})

    register_attention(name, measured, overwrite=True)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        m = nnx.merge(graphdef, state)
        _, aux = m.forward(ids, attention=name, attention_config=options)
        return jnp.stack([a["recall"] for a in aux])

    values = [np.asarray(run(state, jnp.asarray(seq)[None])) for seq in sequences]
    return float(np.mean(values))


# -- outputs -------------------------------------------------------------------------------------------


def write_results(out: str, records: list[dict]) -> None:
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(records, f, indent=2)
    lines = [
        "| method | density | threshold | achieved density | PPL | recall | recall ceiling | retrieval | retrieval, dense decode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        prefill, ceiling = r.get("retrieval_prefill"), r.get("recall_ceiling")
        lines.append(
            f"| {r['method']} | {'' if r['density'] is None else r['density']} | "
            f"{'' if r['threshold'] is None else r['threshold']} | {r['achieved_density']:.3f} | {r['ppl']:.4f} | "
            f"{r['recall']:.3f} | {'' if ceiling is None else f'{ceiling:.3f}'} | {r['retrieval']:.2f} | {'' if prefill is None else f'{prefill:.2f}'} |"
        )
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def merge_results(out: str, parts: list[str]) -> list[dict]:
    """One grid from evaluations run side by side (each `seerjax eval --out PART` on some of the methods):
    their records in order, dense once (every part measures it; the copies must agree), then
    OUT/results.{json,md} and the PPL plot."""
    records, dense = [], None
    missing = [p for p in parts if not os.path.isfile(os.path.join(p, "results.json"))]
    if missing:
        raise EvalError(f"no results.json in {missing}: those evaluations did not finish (see their logs); "
                        f"nothing merged into {out}")
    for part in parts:
        with open(os.path.join(part, "results.json")) as f:
            for r in json.load(f):
                if r["method"] != "dense":
                    records.append(r)
                elif dense is None:
                    dense = r
                elif abs(r["ppl"] - dense["ppl"]) > 1e-3 * dense["ppl"]:
                    raise EvalError(f"dense PPL differs between parts: {dense['ppl']} and {r['ppl']} ({part})")
    records = ([dense] if dense else []) + records
    os.makedirs(out, exist_ok=True)
    write_results(out, records)
    try:
        plot_results(out, records)
    except ImportError:
        pass
    return records


def plot_results(out: str, records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in records if r["method"] == "dense"]
    for method in sorted({r["method"] for r in records} - {"dense"}):
        pts = sorted((r["achieved_density"], r["ppl"]) for r in records if r["method"] == method and r["threshold"] is None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    if dense:
        ax.axhline(dense[0]["ppl"], color="k", linestyle="--", label="dense")
    ax.set_xlabel("achieved density")
    ax.set_ylabel("perplexity")
    ax.set_xscale("log")
    ax.legend()
    ax.set_title("Perplexity vs density")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ppl_vs_density.png"), dpi=120)
    plt.close(fig)


def plot_gate_map(out: str, model, ids, s: EvalSettings, block_size: int) -> None:
    """The gate's block scores beside the ground-truth pooled map, for one layer and head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from seerjax.gate import gate_targets

    from flax import nnx

    attention, options = _on_mesh(s, "pooled", {"implementation": s.implementation})
    graphdef, state = nnx.split(model)

    @jax.jit  # one program: op by op, a model on a mesh compiles hundreds of small ones
    def pooled_aux(state, ids):
        return nnx.merge(graphdef, state).forward(ids, attention=attention, attention_config=options)[1]

    aux = pooled_aux(state, jnp.asarray(ids))
    layer = min(s.plot_layer, len(aux) - 1)
    gate_cfg = model.layers[layer].attn.gate.config
    target = np.asarray(gate_targets(aux[layer]["pooled"], gate_cfg))[0]
    pred = np.asarray(jax.nn.softmax(aux[layer]["gate_logits"], axis=-1))[0]
    head = min(s.plot_head, pred.shape[0] - 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, m, title in ((axes[0], target[head], "ground truth (pooled attention)"), (axes[1], pred[head], "gate")):
        ax.imshow(np.log10(m + 1e-6), cmap="viridis", vmin=-4, vmax=0)
        ax.set_title(f"{title}\nlayer {layer}, head {head}")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gate_vs_truth.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Merge evaluations run side by side into one grid.")
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("out", help="directory for the merged results.json, results.md and plot")
    parser.add_argument("parts", nargs="+", help="the parts' output directories")
    args = parser.parse_args()
    print(open(os.path.join(args.out, "results.md")).read() if merge_results(args.out, args.parts) else "no records")
