"""The embedded corpus and base-model pretraining."""

import json

import numpy as np
import pytest

from seerjax.train import corpus
from seerjax.train.pretrain import PretrainError, PretrainSettings, pretrain


def test_corpus_is_large_long_and_split_by_document(tmp_path, monkeypatch):
    monkeypatch.setenv("SEERJAX_CACHE", str(tmp_path))
    dd = corpus.build()
    train, held = dd["train"], dd["heldout"]
    total = sum(len(t) for t in train["text"]) + sum(len(t) for t in held["text"])
    assert total >= 20e6
    assert sum(len(t) >= 16384 for t in train["text"]) >= 100  # byte-level: bytes are tokens
    assert len(held) >= 20 and set(train["path"]).isdisjoint(held["path"])
    assert all(corpus.is_heldout(p) for p in held["path"])
    # Cached: a second build reads the saved dataset and gives the same split.
    again = corpus.build()
    assert again["heldout"]["path"] == held["path"]
    assert (tmp_path / next(p.name for p in tmp_path.iterdir()) / "manifest.json").exists()


def test_retrieval_documents_hold_their_answer():
    docs = corpus.retrieval_documents(4, ["lorem ipsum " * 100], 600, seed=1)
    key = docs[0].split("The pass key is ")[1][:5]
    assert docs[0].endswith(f"The pass key is {key}") and len(docs[0]) >= 590
    assert "The value of key" in docs[1]
    words = [w for w in docs[2].split() if docs[2].count(f" {w} ") >= 2 and w not in ("lorem", "ipsum")]
    assert words and len(docs[2]) >= 590  # a copy document: random strings written more than once
    assert docs == corpus.retrieval_documents(4, ["lorem ipsum " * 100], 600, seed=1)


def test_synthetic_document_lengths_start_at_the_minimum_fraction():
    texts = [{"text": "lorem ipsum dolor sit amet " * 400}]
    short = corpus.synthetic_documents(texts, 60, 8000, seed=3)
    long = corpus.synthetic_documents(texts, 60, 8000, seed=3, min_fraction=0.75)
    assert min(map(len, short)) < 4000  # default: 1/8 to all of max_chars
    # Passkey and copy documents fill their length; key–value documents (every third, from the second) run to
    # about 60% of it (23 characters per pair, sized at 40).
    assert all(5990 <= len(d) <= 8000 for i, d in enumerate(long) if i % 3 != 1), sorted(map(len, long))[:3]
    assert all(len(d) >= 3400 for d in long)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"min_fraction must be in \\(0, 1\\], got {bad}"):
            corpus.synthetic_documents(texts, 2, 8000, min_fraction=bad)
    # passkey documents (every third, from the first) at their own lengths; the others' lengths unchanged
    full = corpus.synthetic_documents(texts, 60, 8000, seed=3, passkey_min_fraction=1.0)
    assert all(len(d) == 8000 and "What is the pass key?" in d for d in full[::3])
    assert [len(d) for i, d in enumerate(full) if i % 3] == [len(d) for i, d in enumerate(short) if i % 3]
    assert full[1::3] == short[1::3]  # (key–value documents take no haystack: equal whole)
    with pytest.raises(ValueError, match="passkey_min_fraction must be in \\(0, 1\\], got 0"):
        corpus.synthetic_documents(texts, 2, 8000, passkey_min_fraction=0)


def test_pretrain_tiny_resumes_and_exports_a_loadable_byte_model(tmp_path):
    import jax.numpy as jnp

    import seerjax
    from seerjax.train.data import ByteTokenizer, load_tokenizer

    rng = np.random.default_rng(0)
    docs = [rng.integers(97, 105, size=300).astype(np.int32) for _ in range(40)]
    s = PretrainSettings(out=str(tmp_path), preset="tiny", seq_len=64, steps=6, batch=4, save_every=3, warmup=1,
                         retrieval_docs=0, dtype="float32", progress=False)
    first = pretrain(PretrainSettings(**{**s.__dict__, "steps": 3}), docs=docs)
    summary = pretrain(s, docs=docs)
    steps = [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]  # resumed at 3, not restarted
    assert first["final_loss"] is not None and summary["final_loss"] < 5.6  # below uniform over 257 bytes
    model = seerjax.from_pretrained(summary["model"], dtype="float32")
    assert isinstance(load_tokenizer(summary["model"]), ByteTokenizer)
    logits = model(jnp.asarray([[97, 98, 99]]))
    assert logits.shape == (1, 3, 257) and np.isfinite(np.asarray(logits)).all()

    # `seerjax convert` (bf16, small shards: how the GPU study carries the model) keeps the tokenizer marker.
    from seerjax.cli import main

    assert main(["convert", "--model", summary["model"], "--out", str(tmp_path / "bf16"), "--max-shard-size", "20KB"]) == 0
    assert len(list((tmp_path / "bf16").glob("model-*.safetensors"))) > 1
    assert isinstance(load_tokenizer(str(tmp_path / "bf16")), ByteTokenizer)
    again = seerjax.from_pretrained(str(tmp_path / "bf16"), dtype="float32")
    np.testing.assert_allclose(np.asarray(again(jnp.asarray([[97, 98, 99]]))), np.asarray(logits), atol=0.1)


def test_pretrain_starts_from_a_model_of_the_same_architecture(tmp_path, capsys):
    """--init-model: a pretrain at a longer length continues from one at a shorter length (lr 0 keeps the
    parameters exactly), and a model of another architecture, or no model, is refused by name."""
    import jax
    import jax.numpy as jnp

    import seerjax
    from seerjax.errors import MissingFileError

    rng = np.random.default_rng(0)
    docs = [rng.integers(97, 105, size=300).astype(np.int32) for _ in range(40)]
    base = dict(preset="tiny", steps=2, batch=2, warmup=1, retrieval_docs=0, dtype="float32", progress=False)
    short = pretrain(PretrainSettings(out=str(tmp_path / "short"), seq_len=32, **base), docs=docs)
    longer = pretrain(PretrainSettings(out=str(tmp_path / "long"), seq_len=96, lr=0.0, init_model=short["model"],
                                       **base), docs=docs)
    assert "its RoPE" not in capsys.readouterr().out  # the same RoPE: nothing to say
    a = seerjax.from_pretrained(short["model"], dtype="float32")
    b = seerjax.from_pretrained(longer["model"], dtype="float32")
    assert b.config.max_position_embeddings == a.config.max_position_embeddings  # max(seq_len, 2048) both
    from flax import nnx

    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = pretrain(PretrainSettings(out=str(tmp_path / "fresh"), seq_len=96, lr=0.0, **base), docs=docs)
    c = seerjax.from_pretrained(fresh["model"], dtype="float32")
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                   zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(c, nnx.Param))))

    # a longer stage may extend the context by a RoPE scaling: same parameters, the new RoPE in the export
    scaled = pretrain(PretrainSettings(out=str(tmp_path / "scaled"), seq_len=96, lr=0.0, init_model=short["model"],
                                       rope_scaling="llama3:3", **base), docs=docs)
    assert "its RoPE RopeConfig(rope_type='default'" in capsys.readouterr().out  # the change is said
    d = seerjax.from_pretrained(scaled["model"], dtype="float32")
    assert (d.config.rope.rope_type, d.config.rope.factor, d.config.rope.original_max_position_embeddings) == ("llama3", 3.0, 32)
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(d, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    tokens = jnp.asarray(rng.integers(97, 105, size=(1, 80)))
    assert not np.allclose(np.asarray(a(tokens)), np.asarray(d(tokens)), atol=1e-4)  # positions past 32 rotate less

    with pytest.raises(PretrainError, match="hidden_size: 64 there, 128 here"):
        pretrain(PretrainSettings(out=str(tmp_path / "mini"), **{**base, "preset": "mini"}, seq_len=32,
                                  init_model=short["model"]), docs=docs)
    with pytest.raises(MissingFileError, match="--init-model .*nowhere: no config.json there"):
        pretrain(PretrainSettings(out=str(tmp_path / "x"), seq_len=32, init_model=str(tmp_path / "nowhere"), **base),
                 docs=docs)


def test_bad_pretrain_settings():
    with pytest.raises(PretrainError, match="preset"):
        PretrainSettings(out="x", preset="huge")
    with pytest.raises(PretrainError, match="steps"):
        PretrainSettings(out="x", steps=0)
    for theta in (0.5, float("nan"), "1e4"):
        with pytest.raises(PretrainError, match="rope_theta must be a finite number > 1"):
            PretrainSettings(out="x", rope_theta=theta)
    for f in (0, 1.2, "0.5", True):
        with pytest.raises(PretrainError, match=f"retrieval_min_fraction must be a number in \\(0, 1\\], got {f!r}"):
            PretrainSettings(out="x", retrieval_min_fraction=f)


def test_pretrain_rope_scaling_reaches_the_model_config_and_bad_specs_are_refused():
    from seerjax.cli import build_parser
    from seerjax.rope import rope_frequencies
    from seerjax.train.pretrain import model_config

    args = build_parser()[0].parse_args(["pretrain", "--out", "x", "--seq-len", "16384", "--rope-scaling", "llama3:2"])
    rope = model_config(PretrainSettings(out="x", seq_len=args.seq_len, rope_scaling=args.rope_scaling)).rope
    assert (rope.rope_type, rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor,
            rope.original_max_position_embeddings) == ("llama3", 10000.0, 2.0, 1.0, 4.0, 8192)
    inv, _ = rope_frequencies(rope, 64)
    base, _ = rope_frequencies(model_config(PretrainSettings(out="x", seq_len=8192)).rope, 64)
    wavelength = 2 * np.pi / base
    np.testing.assert_allclose(inv[wavelength < 2048], base[wavelength < 2048])  # short wavelengths kept
    np.testing.assert_allclose(inv[wavelength > 8192], base[wavelength > 8192] / 2, rtol=1e-6)  # long ones stretched
    rope = model_config(PretrainSettings(out="x", seq_len=4096, rope_theta=5e4, rope_scaling="linear:4:1024")).rope
    assert (rope.rope_type, rope.theta, rope.factor) == ("linear", 5e4, 4.0)
    assert model_config(PretrainSettings(out="x", seq_len=4096, rope_scaling="yarn:2")).rope.original_max_position_embeddings == 2048
    for spec, message in [("llama3", "TYPE:FACTOR\\[:ORIGINAL\\]"), ("ntk:2", "TYPE one of"),
                          ("llama3:x", "FACTOR must be a number"), ("llama3:1", "FACTOR must be a finite number > 1"),
                          ("llama3:nan", "FACTOR must be a finite number > 1"),
                          ("llama3:2:4096", "ORIGINAL must be an integer from 16 to below seq_len=4096"),
                          ("llama3:2:8", "got 8"), ("llama3:2:1.5", "ORIGINAL an integer")]:
        with pytest.raises(PretrainError, match=f"rope_scaling.*{message}"):
            PretrainSettings(out="x", seq_len=4096, rope_scaling=spec)


def test_pretrain_rope_theta_reaches_the_model_config():
    from seerjax.cli import build_parser
    from seerjax.train.pretrain import model_config

    args = build_parser()[0].parse_args(["pretrain", "--out", "x", "--rope-theta", "500000"])
    assert args.rope_theta == 500000.0
    assert model_config(PretrainSettings(out="x", rope_theta=args.rope_theta)).rope.theta == 500000.0
    assert model_config(PretrainSettings(out="x")).rope.theta == 10000.0
    args = build_parser()[0].parse_args(["pretrain", "--out", "x", "--retrieval-min-fraction", "0.5"])
    assert args.retrieval_min_fraction == 0.5


def test_pretrain_retrieval_min_fraction_sets_the_synthetic_lengths(tmp_path):
    from seerjax.cli import build_parser
    from seerjax.train.pretrain import training_documents

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 2000)
    s = PretrainSettings(out="x", data=str(tmp_path / "a.txt"), seq_len=1024, retrieval_docs=12)
    default = [len(d) for d in training_documents(s)[1]]
    long = [len(d) for d in training_documents(PretrainSettings(**{**s.__dict__, "retrieval_min_fraction": 0.8}))[1]]
    assert len(long) == 12 and max(long) <= 1024, long
    assert min(x for i, x in enumerate(long) if i % 3 != 1) >= 0.8 * 1024 - 1, long
    assert min(default) < 0.5 * 1024, default
    full = training_documents(PretrainSettings(**{**s.__dict__, "passkey_min_fraction": 1.0}))[1]
    assert [len(d) for d in full[::3]] == [1024] * 4 and all(bytes(np.asarray(d[-5:], np.uint8)).isdigit() for d in full[::3])
    assert [len(d) for i, d in enumerate(full) if i % 3] == [x for i, x in enumerate(default) if i % 3]
    args = build_parser()[0].parse_args(["pretrain", "--out", "x", "--passkey-min-fraction", "1"])
    assert args.passkey_min_fraction == 1.0 and build_parser()[0].parse_args(["pretrain", "--out", "x"]).passkey_min_fraction is None
    for f in (0, 1.5, "1"):
        with pytest.raises(PretrainError, match=f"passkey_min_fraction must be a number in \\(0, 1\\], got {f!r}"):
            PretrainSettings(out="x", passkey_min_fraction=f)


def test_a_prepared_corpus_travels_through_seerjax_corpus(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    for i in range(40):
        (root / "pkg" / f"m{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 100)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: str(root))
    prepared = tmp_path / "prepared"
    dd = corpus.build(str(prepared))
    assert len(dd["train"]) + len(dd["heldout"]) == 40
    # Another machine (here: another stdlib) loads the prepared corpus, not its own library.
    monkeypatch.setattr(corpus, "stdlib_root", lambda: str(tmp_path / "nowhere"))
    monkeypatch.setenv("SEERJAX_CORPUS", str(prepared))
    assert corpus.load_embedded("train")["path"] == dd["train"]["path"]
    assert len(corpus.load_embedded("all")) == 40
    monkeypatch.setenv("SEERJAX_CORPUS", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="SEERJAX_CORPUS=.*missing.*manifest.json"):
        corpus.load_embedded("train")


def test_corpus_cache_survives_concurrent_builds_and_replaces_a_stale_one(tmp_path, monkeypatch):
    """Processes that prepare the corpus at once (parallel tests, side-by-side commands) each publish a complete
    copy by renaming it into place; a cache of another library is replaced whole; no temporary copy is left."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    for i in range(30):
        (root / "pkg" / f"m{i}.py").write_text(f"# module {i}\n" + "y = 2\n" * 80)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: str(root))
    cache = tmp_path / "cache" / "corpus-x"
    with ThreadPoolExecutor(4) as pool:
        built = list(pool.map(lambda _: corpus.build(str(cache)), range(4)))
    assert all(len(d["train"]) + len(d["heldout"]) == 30 for d in built)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus-x"]
    assert len(corpus.build(str(cache))["train"]) == len(built[0]["train"])
    # a stale cache (another library's files) is replaced whole
    manifest = json.loads((cache / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "files_sha256": "other"}))
    (cache / "junk").write_text("left from the old copy")
    assert len(corpus.build(str(cache))["heldout"]) == len(built[0]["heldout"])
    assert not (cache / "junk").exists() and json.loads((cache / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["corpus-x"]
