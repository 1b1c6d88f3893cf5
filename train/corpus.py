"""The embedded corpus: real long human-written documents every machine has offline.

Source: the Python standard library of the running interpreter (`sysconfig.get_paths()["stdlib"]`, without
site-packages): about 1,900 source and text files, 32 MB for CPython 3.11, of which about 470 exceed 16k
bytes (16k tokens for the byte-level models). It is human-written, long-range structured (definitions used
thousands of lines later, docstrings, cross references), identical on every machine with the same
CPython minor version, and needs no network. Documents are whole files, in sorted path order; the
held-out split is chosen by a hash of the relative path, so it is stable across machines and runs.

Mixed in for pretraining: synthetic retrieval documents (passkey and key–value recall) whose haystack is
corpus text, so the base model learns long-range retrieval and the retrieval test means something.

The prepared corpus is cached with `datasets` (`save_to_disk`) under `~/.cache/seerjax/corpus-<tag>`.
A corpus prepared on one machine travels to another as a directory: `python -m seerjax.train.corpus DIR`
writes it, and `SEERJAX_CORPUS=DIR` makes every command there use it instead of its own interpreter's
library (the GPU image's Python 3.12 library is smaller: 543 files).
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig

import numpy as np

SUFFIXES = (".py", ".txt", ".rst")
HELDOUT_PERCENT = 5


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def corpus_files(root: str | None = None) -> list[str]:
    """Relative paths of the corpus files under the stdlib root, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        for f in sorted(filenames):
            if f.endswith(SUFFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def _cache_dir() -> str:
    base = os.environ.get("SEERJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "seerjax"))
    import sys

    return os.path.join(base, f"corpus-stdlib-{sys.version_info.major}.{sys.version_info.minor}")


def load_prepared(path: str):
    """A corpus written by `build(path)` (or `python -m seerjax.train.corpus DIR`) on any machine."""
    import datasets

    if not (os.path.isfile(os.path.join(path, "manifest.json")) and os.path.isdir(os.path.join(path, "data"))):
        raise ValueError(
            f"SEERJAX_CORPUS={path!r} is not a prepared corpus: expected manifest.json and data/ in it, as "
            "written by `python -m seerjax.train.corpus DIR`"
        )
    return datasets.load_from_disk(os.path.join(path, "data"))


def build(cache_dir: str | None = None):
    """Reads the corpus into a `datasets.DatasetDict` with splits `train` and `heldout` (columns path, text).

    With no `cache_dir` and `SEERJAX_CORPUS` set, the prepared corpus there is loaded instead."""
    import datasets

    if cache_dir is None and os.environ.get("SEERJAX_CORPUS"):
        return load_prepared(os.environ["SEERJAX_CORPUS"])
    cache_dir = cache_dir or _cache_dir()
    root = stdlib_root()
    files = corpus_files(root)
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    if _manifest_digest(cache_dir) == digest:
        return datasets.load_from_disk(os.path.join(cache_dir, "data"))
    rows = {"train": {"path": [], "text": []}, "heldout": {"path": [], "text": []}}
    for rel in files:
        with open(os.path.join(root, rel), encoding="utf-8", errors="replace") as f:
            text = f.read()
        if len(text) < 256:
            continue
        split = "heldout" if is_heldout(rel) else "train"
        rows[split]["path"].append(rel)
        rows[split]["text"].append(text)
    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in rows.items()})
    total = sum(len(t) for v in rows.values() for t in v["text"])
    manifest = {"root": root, "files_sha256": digest, "documents": len(files), "bytes": total}
    _publish(cache_dir, dd, manifest)
    return dd


def _manifest_digest(cache_dir: str) -> str | None:
    try:
        with open(os.path.join(cache_dir, "manifest.json")) as f:
            return json.load(f).get("files_sha256")
    except (OSError, ValueError):
        return None


def _publish(cache_dir: str, dd, manifest: dict) -> None:
    """Writes the prepared corpus beside `cache_dir` and renames it into place, so processes that prepare it at
    the same time (parallel tests, side-by-side commands) never read or write a half-written cache: each renames a
    complete copy, and one that finds another's already there keeps that one."""
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(cache_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".corpus-build-", dir=parent)
    try:
        dd.save_to_disk(os.path.join(tmp, "data"))
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)
        if _manifest_digest(cache_dir) == manifest["files_sha256"]:
            return  # another process put the same corpus in place meanwhile (and may be reading it)
        if os.path.exists(cache_dir):  # a stale cache (another library): move it aside, then remove it
            stale = tempfile.mkdtemp(prefix=".corpus-stale-", dir=parent)
            try:
                os.replace(cache_dir, os.path.join(stale, "old"))
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, cache_dir)
        except OSError:
            pass  # another process's complete copy is in place already
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_embedded(split: str = "train"):
    """The `train`, `heldout` or `all` split as a `datasets.Dataset` with a `text` column."""
    import datasets

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"embedded corpus split must be 'train', 'heldout' or 'all', got {split!r}")
    dd = build()
    if split == "all":
        return datasets.concatenate_datasets([dd["train"], dd["heldout"]])
    return dd[split]


# -- synthetic retrieval documents ---------------------------------------------------------------------


def passkey_document(rng: np.random.Generator, haystack: str, length_chars: int) -> str:
    """A passkey document: haystack text with a key sentence at a random depth, then the question and answer.

    Same phrasing as the evaluation's passkey test, so pretraining teaches exactly the skill it measures.
    """
    key = int(rng.integers(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tail = f" What is the pass key? The pass key is {key}"
    body = max(length_chars - len(needle) - len(tail), 0)
    hay = (haystack * (1 + body // max(len(haystack), 1)))[:body]
    at = int(rng.integers(0, body + 1))
    return hay[:at] + needle + hay[at:] + tail


def kv_document(rng: np.random.Generator, pairs: int) -> str:
    """Key–value recall: random keys with values, then a few keys asked again."""
    keys = [f"{int(x):06x}" for x in rng.integers(0, 16**6, size=pairs)]
    values = [str(int(x)) for x in rng.integers(1000, 9999, size=pairs)]
    body = " ".join(f"key {k} value {v}." for k, v in zip(keys, values))
    asks = rng.choice(pairs, size=min(4, pairs), replace=False)
    return body + " " + " ".join(f"The value of key {keys[i]} is {values[i]}." for i in asks)


def copy_document(rng: np.random.Generator, haystack: str, length_chars: int) -> str:
    """Random strings, each written two or three times at random places in real text.

    Every byte of a repeat after its first is predictable only by finding the earlier occurrence, a dense
    training signal for the content-based copying (induction) that passkey retrieval needs; the passkey
    documents alone give one answer per document.
    """
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789_"))
    pieces = []
    for _ in range(max(1, length_chars // 400)):
        word = "".join(rng.choice(alphabet, int(rng.integers(6, 33))))
        pieces += [f" {word} "] * int(rng.integers(2, 4))
    rng.shuffle(pieces)
    body = max(length_chars - sum(len(p) for p in pieces), 0)
    hay = (haystack * (1 + body // max(len(haystack), 1)))[:body]
    cuts = np.sort(rng.integers(0, body + 1, size=len(pieces)))
    out, prev = [], 0
    for cut, piece in zip(cuts, pieces):
        out += [hay[prev:cut], piece]
        prev = int(cut)
    return "".join(out) + hay[prev:]


KINDS = ("passkey", "kv", "copy")


def retrieval_documents(n: int, texts: list[str], length_chars: int, seed: int = 0, first_kind: int = 0) -> list[str]:
    """n synthetic documents cycling through passkey (haystacks cut from `texts`), key–value recall and
    copy documents, starting at kind `first_kind` (an index into `KINDS`)."""
    rng = np.random.default_rng([seed, 4242])
    out = []
    for i in range(n):
        kind = KINDS[(i + first_kind) % len(KINDS)]
        if kind == "kv":
            out.append(kv_document(rng, max(4, length_chars // 40)))
            continue
        src = texts[int(rng.integers(0, len(texts)))]
        start = int(rng.integers(0, max(len(src) - length_chars, 1)))
        hay = src[start : start + length_chars]
        out.append(passkey_document(rng, hay, length_chars) if kind == "passkey" else copy_document(rng, hay, length_chars))
    return out


SYNTHETIC_MIN_FRACTION = 0.125  # synthetic documents run from this fraction of their maximum length to all of it


def synthetic_documents(texts, n: int, max_chars: int, seed: int = 0,
                        min_fraction: float = SYNTHETIC_MIN_FRACTION,
                        passkey_min_fraction: float | None = None) -> list[str]:
    """n synthetic documents (passkey, key–value, copy, in turn) of `min_fraction` (default 1/8) to all of
    `max_chars` characters, haystacks cut from the first 2000 documents of `texts` (a dataset or list of dicts
    with `text`).

    `passkey_min_fraction` (default: `min_fraction`) gives the passkey documents their own shortest length. A
    needle sits at a uniform depth, so its distance from the question is spread over the document's length:
    1.0 (every passkey document `max_chars` long) spreads distances evenly up to `max_chars`, where the default
    lengths put about 4% of needles in the last quarter of that range.
    """
    for name, f in (("min_fraction", min_fraction), ("passkey_min_fraction", passkey_min_fraction)):
        if f is not None and not 0.0 < f <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {f!r}")
    sample = [texts[i]["text"] for i in range(min(len(texts), 2000))]

    def draw(rng, fraction, size):  # uniform lengths from `fraction` of max_chars (at least 64) to all of it
        return rng.integers(max(int(max_chars * fraction), 64), max(max_chars, 64) + 1, size=size)

    lengths = draw(np.random.default_rng(seed), min_fraction, n)
    if passkey_min_fraction is not None:  # (the other kinds keep the lengths drawn above)
        passkeys = np.arange(0, n, len(KINDS))  # document i is of kind KINDS[i % 3]
        lengths[passkeys] = draw(np.random.default_rng([seed, 31337]), passkey_min_fraction, len(passkeys))
    out = []
    for i, length in enumerate(lengths):
        out += retrieval_documents(1, sample, int(length), seed=seed * 100003 + i, first_kind=i)
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the embedded corpus of this interpreter to DIR (for SEERJAX_CORPUS).")
    parser.add_argument("out", help="directory to write (data/ and manifest.json)")
    out_dir = parser.parse_args().out
    build(out_dir)
    with open(os.path.join(out_dir, "manifest.json")) as f:
        print(f.read())
