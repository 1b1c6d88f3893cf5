"""Data pipeline: sources, tokenization, deterministic packing, splits, errors."""

import json

import numpy as np
import pytest

from seerjax.train.data import (
    ByteTokenizer,
    DataError,
    PackedSequences,
    load_texts,
    load_tokenizer,
    packed_from_source,
    split_documents,
)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("alpha document " * 10)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * 5}) for i in range(3)))
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.txt").write_text("gamma " * 20)
    return tmp_path


def test_sources_file_dir_glob(corpus):
    assert len(load_texts(str(corpus / "a.txt"))) == 1
    assert len(load_texts(str(corpus / "b.jsonl"))) == 3
    assert len(load_texts(str(corpus))) == 5
    assert len(load_texts(str(corpus / "*.txt"))) == 1
    assert len(load_texts(str(corpus / "**" / "*.txt"))) == 2


def test_parquet_source(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["one doc", "two doc"], "other": [1, 2]}).to_parquet(str(tmp_path / "d.parquet"))
    assert load_texts(str(tmp_path / "d.parquet"))["text"] == ["one doc", "two doc"]


def test_packing_is_deterministic_resumable_and_separates_documents(corpus):
    tok = ByteTokenizer()
    p1 = packed_from_source(str(corpus), tok, 16, seed=3)
    p2 = packed_from_source(str(corpus), tok, 16, seed=3)
    np.testing.assert_array_equal(p1.batch(0, 4), p2.batch(0, 4))
    # Resuming at position 2 gives the same sequences as the uninterrupted stream.
    np.testing.assert_array_equal(p1.batch(0, 4)[2:], p2.batch(2, 2))
    # EOS separates documents; every token of an epoch appears once.
    epoch = p1.batch(0, p1.per_epoch)
    assert (epoch == tok.eos_token_id).sum() >= 4
    other_seed = packed_from_source(str(corpus), tok, 16, seed=4)
    assert not np.array_equal(other_seed.batch(0, p1.per_epoch), epoch)
    # Crossing into the next epoch reshuffles but keeps shapes.
    assert p1.batch(p1.per_epoch - 1, 3).shape == (3, 16)


def test_split_by_document():
    docs = [np.full(5, i, np.int32) for i in range(10)]
    train, held = split_documents(docs, 0.2, seed=0)
    assert len(train) == 8 and len(held) == 2
    assert {int(d[0]) for d in train}.isdisjoint({int(d[0]) for d in held})
    with pytest.raises(DataError, match="heldout_fraction"):
        split_documents(docs, 1.5)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="suffix"):
        load_texts(str(tmp_path / "x.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no"):
        load_texts(str(empty))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "no text field"}))
    with pytest.raises(DataError, match="'text'"):
        load_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="empty data"):
        PackedSequences([], 8, 256)
    with pytest.raises(DataError, match="fewer than one sequence"):
        PackedSequences([np.arange(3, dtype=np.int32)], 64, 256)
    with pytest.raises(DataError, match="no tokenizer"):
        (tmp_path / "m").mkdir()
        load_tokenizer(str(tmp_path / "m"))


def test_byte_tokenizer_model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"seerjax_tokenizer": "bytes"}))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, ByteTokenizer)
    assert tok.decode(tok.encode("héllo")) == "héllo"


def test_whole_documents_are_never_cut():
    rng = np.random.default_rng(0)
    stream = [rng.integers(0, 200, size=int(n)).astype(np.int32) for n in rng.integers(5, 80, size=40)]
    # Whole documents are marked by values no stream document has (1000 + i), each 4..20 tokens.
    whole = [np.full(int(n), 1000 + i, np.int32) for i, n in enumerate(rng.integers(4, 21, size=12))]
    p = PackedSequences(stream, 32, 256, seed=1, whole=whole)
    total = sum(len(d) + 1 for d in stream)
    groups = len(p._groups)
    assert groups < 12  # short whole documents share sequences
    fill = groups * 32 - sum(len(w) + 1 for w in whole)
    assert p.per_epoch == groups + (total - fill) // 32
    for epoch in range(2):
        rows = np.stack([p.sequence(epoch * p.per_epoch + i) for i in range(p.per_epoch)])
        seen = []
        for row in rows:
            at = 0
            while row[at] >= 1000:  # whole documents first in their row, each complete and followed by EOS
                i = int(row[at]) - 1000
                assert np.array_equal(row[at : at + len(whole[i])], whole[i]) and row[at + len(whole[i])] == 256
                seen.append(i)
                at += len(whole[i]) + 1
            assert not np.any(row[at:] >= 1000)  # and nowhere else
        assert sorted(seen) == list(range(12))
    assert not np.array_equal(p.sequence(0), p.sequence(p.per_epoch))  # epochs are reshuffled
    with pytest.raises(DataError, match="whole document 0 has 32 tokens"):
        PackedSequences(stream, 32, 256, whole=[np.zeros(32, np.int32)])
    with pytest.raises(DataError, match="need .* stream tokens"):
        PackedSequences(stream[:1], 32, 256, whole=[np.zeros(20, np.int32)] * 12)

