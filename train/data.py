"""Text sources → tokenized documents → fixed-length packed sequences, deterministic and resumable.

A SOURCE is one of:
  * a `.txt` file (one document), a `.jsonl` / `.json` / `.parquet` file (one document per record's
    `text` field), a directory or a glob of such files;
  * ``embedded`` or ``embedded:<split>`` — the project's offline corpus (see `seerjax.train.corpus`);
  * otherwise a Hugging Face hub dataset name (``name`` or ``name:config``), used where the hub is reachable.

Packing concatenates documents, in an order drawn from the seed for each epoch, with EOS between them
and cuts the stream into sequences of `seq_len` tokens. A position is the number of sequences consumed,
so saving it with a checkpoint and asking for the next batch after a restart gives the same data.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from seerjax.train.corpus import SYNTHETIC_MIN_FRACTION

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """A data source that cannot be read or used."""


class ByteTokenizer:
    """Byte-level tokenizer for the project's byte models: ids 0–255 are bytes, 256 is EOS."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __call__(self, texts: Sequence[str]) -> dict:
        return {"input_ids": [self.encode(t) for t in texts]}


def load_tokenizer(model_dir: str):
    """The model directory's HF tokenizer, or the byte tokenizer for models that declare byte-level input."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if any(os.path.exists(os.path.join(model_dir, n)) for n in names):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    config_path = os.path.join(model_dir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            config = json.load(f)
        if config.get("seerjax_tokenizer") == "bytes":
            return ByteTokenizer()
    raise DataError(
        f"model directory {model_dir!r} has no tokenizer (expected one of {names}, or "
        '"seerjax_tokenizer": "bytes" in config.json for byte-level models)'
    )


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; packing needs one between documents")
    return int(eos)


def _files_of(source: str) -> list[str]:
    if os.path.isdir(source):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(source)
            for f in names
            if f.endswith(TEXT_SUFFIXES)
        )
        if not files:
            raise DataError(f"data directory {source!r} holds no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(f for f in globlib.glob(source, recursive=True) if f.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"data glob {source!r} matches no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    if os.path.isfile(source):
        if not source.endswith(TEXT_SUFFIXES):
            raise DataError(f"data file {source!r} has an unsupported suffix; expected one of {TEXT_SUFFIXES}")
        return [source]
    return []


def load_texts(source: str):
    """A `datasets.Dataset` with one document per row in column `text`."""
    import datasets

    if not isinstance(source, str) or not source:
        raise DataError(f"data source must be a non-empty string, got {source!r}")
    if source == "embedded" or source.startswith("embedded:"):
        from seerjax.train import corpus

        split = source.split(":", 1)[1] if ":" in source else "train"
        return corpus.load_embedded(split)
    files = _files_of(source)
    if not files:
        if source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES):
            raise FileNotFoundError(f"data source {source!r} does not exist")
        name, _, config = source.partition(":")
        try:
            return datasets.load_dataset(name, config or None, split="train")
        except Exception as e:  # the hub raises many types; the user needs the source named
            raise DataError(f"could not load data source {source!r} as a local path or a hub dataset: {e}") from e
    texts: list[str] = []
    for path in files:
        texts.extend(_read_file(path))
    if not texts:
        raise DataError(f"data source {source!r} holds no documents")
    return datasets_from_texts(texts)


def _read_file(path: str) -> list[str]:
    import datasets

    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        return [text] if text else []
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise DataError(f"could not read data file {path!r} as {kind}: {e}") from e
    if "text" not in ds.column_names:
        raise DataError(f"data file {path!r} has no 'text' field; its fields are {ds.column_names}")
    return [t for t in ds["text"] if t]


def tokenize_documents(texts_ds, tokenizer, *, num_proc: int | None = None) -> list[np.ndarray]:
    """Tokenizes each document (no special tokens) with `datasets.map`; returns int32 arrays."""

    def encode(batch):
        if isinstance(tokenizer, ByteTokenizer):
            ids = tokenizer(batch["text"])["input_ids"]
        else:
            ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": ids}

    tokenized = texts_ds.map(encode, batched=True, remove_columns=texts_ds.column_names, num_proc=num_proc)
    docs = [np.asarray(ids, dtype=np.int32) for ids in tokenized["input_ids"]]
    docs = [d for d in docs if d.size]
    if not docs:
        raise DataError("the data source holds no non-empty documents after tokenization")
    return docs


@dataclasses.dataclass
class PackedSequences:
    """Documents packed into `seq_len`-token sequences; epoch e uses document order permuted by (seed, e).

    `docs` form one EOS-separated stream cut every `seq_len` tokens, so a document may span two sequences.
    The `whole` documents (each shorter than `seq_len`) are never cut: they are packed, EOS-separated,
    into sequences of their own (next fit in a fixed seeded order), whose remaining tokens come from the
    stream. Synthetic retrieval documents go there: a passkey split across two sequences teaches nothing
    about retrieving over its full distance.
    """

    docs: list[np.ndarray]
    seq_len: int
    eos_id: int
    seed: int = 0
    whole: list[np.ndarray] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.seq_len < 1:
            raise DataError(f"seq_len must be positive, got {self.seq_len}")
        if not self.docs:
            raise DataError("no documents to pack (empty data)")
        for i, d in enumerate(self.whole):
            if not 0 < len(d) < self.seq_len:
                raise DataError(f"whole document {i} has {len(d)} tokens; whole documents must be 1 to seq_len-1={self.seq_len - 1}")
        total = sum(len(d) + 1 for d in self.docs)
        self._groups, used = [], []  # whole documents per sequence, and the tokens they fill
        for i in np.random.default_rng([self.seed, 104729]).permutation(len(self.whole)):
            n = len(self.whole[i]) + 1
            if self._groups and used[-1] + n <= self.seq_len:
                self._groups[-1].append(int(i))
                used[-1] += n
            else:
                self._groups.append([int(i)])
                used.append(n)
        fill = sum(self.seq_len - u for u in used)  # stream tokens the whole documents' sequences take
        if fill > total:
            raise DataError(
                f"the {len(self.whole)} whole documents need {fill} stream tokens to fill their sequences, "
                f"but the other documents hold only {total}"
            )
        self.per_epoch = len(self._groups) + (total - fill) // self.seq_len
        if self.per_epoch == 0:
            raise DataError(
                f"the data holds {total} tokens (with EOS separators), fewer than one sequence of seq_len={self.seq_len}"
            )
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_stream(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.docs))
            eos = np.asarray([self.eos_id], np.int32)
            stream = np.concatenate([piece for i in order for piece in (self.docs[i], eos)])
            rows, at = [], 0
            for group in self._groups:
                head = [piece for i in group for piece in (self.whole[i], eos)]
                n = self.seq_len - sum(len(x) for x in head)
                rows.append(np.concatenate([*head, stream[at : at + n]]).astype(np.int32))
                at += n
            plain = (self.per_epoch - len(rows)) * self.seq_len
            rows += list(stream[at : at + plain].reshape(-1, self.seq_len))
            rows = np.stack(rows)
            if self.whole:  # whole-document rows spread over the epoch, not all at its start
                rows = rows[rng.permutation(len(rows))]
            self._epoch_cache = (epoch, rows)
        return self._epoch_cache[1]

    def sequence(self, index: int) -> np.ndarray:
        epoch, i = divmod(int(index), self.per_epoch)
        return self._epoch_stream(epoch)[i]

    def batch(self, position: int, batch_size: int) -> np.ndarray:
        """Sequences `position .. position + batch_size - 1` as int32 `[batch_size, seq_len]`."""
        return np.stack([self.sequence(position + j) for j in range(batch_size)])


def split_documents(docs: list[np.ndarray], heldout_fraction: float, seed: int = 0):
    """Splits documents (not tokens) into (train, held_out), deterministically from the seed."""
    if not 0.0 < heldout_fraction < 1.0:
        raise DataError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split into train and held-out, got {len(docs)}")
    order = np.random.default_rng([seed, 7919]).permutation(len(docs))
    n_held = max(1, int(round(len(docs) * heldout_fraction)))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [docs[i] for i in train], [docs[i] for i in held]


def packed_from_source(source: str, tokenizer, seq_len: int, seed: int = 0, retrieval_docs: int = 0) -> PackedSequences:
    """The whole pipeline: SOURCE → documents → tokens → packed sequences; `retrieval_docs` synthetic
    passkey / key–value / copy documents (haystacks from SOURCE, up to seq_len-1 tokens, each kept whole
    within one sequence) mixed in."""
    texts = load_texts(source)
    docs = tokenize_documents(texts, tokenizer)
    whole = []
    if retrieval_docs:
        # Characters per token of this tokenizer on the data, so synthetic documents fit seq_len tokens.
        chars = sum(len(texts[i]["text"]) for i in range(min(len(texts), 50)))
        tokens = sum(len(d) for d in docs[:50])
        max_chars = int((seq_len - 1) * max(chars / max(tokens, 1), 1.0))
        docs, whole = split_whole(docs, synthetic_token_documents(texts, tokenizer, retrieval_docs, max_chars, seed=seed), seq_len)
    return PackedSequences(docs, seq_len, _eos_id(tokenizer), seed, whole=whole)


def split_whole(docs: list[np.ndarray], synthetic: list[np.ndarray], seq_len: int):
    """(stream documents, whole documents): synthetic documents that fit a sequence are kept whole; any
    longer one (a tokenizer that packs fewer characters per token than estimated) joins the stream."""
    fits = [d for d in synthetic if 0 < len(d) < seq_len]
    return docs + [d for d in synthetic if not 0 < len(d) < seq_len], fits


def synthetic_token_documents(texts_ds, tokenizer, n: int, max_chars: int, seed: int = 0,
                              min_fraction: float = SYNTHETIC_MIN_FRACTION,
                              passkey_min_fraction: float | None = None) -> list[np.ndarray]:
    """n synthetic passkey / key–value / copy documents of `min_fraction` to all of max_chars characters,
    haystacks cut from `texts_ds`, tokenized like the data (`seerjax.train.corpus.synthetic_documents`)."""
    from seerjax.train.corpus import synthetic_documents

    docs = synthetic_documents(texts_ds, n, max_chars, seed=seed, min_fraction=min_fraction,
                               passkey_min_fraction=passkey_min_fraction)
    return tokenize_documents(datasets_from_texts(docs), tokenizer)


def datasets_from_texts(texts: list[str]):
    """A `datasets.Dataset` with one document per row in column `text`."""
    import datasets

    return datasets.Dataset.from_dict({"text": list(texts)})
