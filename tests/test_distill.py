"""Gate distillation: loss falls, only gates change, optimizer state size, kill -9 resume, CLI, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from seerjax.config import ModelConfig
from seerjax.gate import GateParam
from seerjax.model import LlamaModel
from seerjax.train.data import PackedSequences
from seerjax.train.distill import DistillError, DistillSettings, distill

TINY = dict(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32)


def peaky_model(seed=0):
    """A tiny random model whose attention is far from uniform, so its pooled maps carry structure."""
    model = LlamaModel(ModelConfig(**TINY), dtype=jnp.float32, rngs=nnx.Rngs(seed))
    for layer in model.layers:
        layer.attn.q_proj[...] = layer.attn.q_proj[...] * 30
        layer.attn.k_proj[...] = layer.attn.k_proj[...] * 30
    return model


def random_docs(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=rng.integers(50, 400)).astype(np.int32) for _ in range(n)]


def settings(out, **kw):
    base = dict(model="unused", data="unused", seq_len=128, steps=30, out=str(out), batch=2, block_size=16, d_gate=32,
                implementation="reference", warmup=3, save_every=10, progress=False, lr=1e-2)
    base.update(kw)
    return DistillSettings(**base)


def test_loss_falls_only_gates_change_and_optimizer_state_is_two_gate_copies(tmp_path):
    model = peaky_model()
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    data = PackedSequences(random_docs(), 128, 256, seed=0)
    result = distill(settings(tmp_path), model=model, data=data)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.7 * first, result.losses
    # The base model is bit-identical: no gradient, no update ever reaches it.
    after = nnx.state(model, nnx.Param)
    before_flat = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    after_flat = {p: v for p, v in jax.tree_util.tree_flatten_with_path(after)[0] if "'gate'" not in str(p)}
    assert before_flat.keys() == after_flat.keys()
    for path, a in before_flat.items():
        np.testing.assert_array_equal(a, np.asarray(after_flat[path]), err_msg=str(path))
    # AdamW keeps two moments per gate parameter and nothing for frozen weights (plus int32 step counters).
    gate_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, GateParam)))
    assert result.gate_bytes == gate_bytes
    assert 2 * gate_bytes <= result.optimizer_bytes <= 2 * gate_bytes + 16
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines] == list(range(1, 31)) and all("loss" in x for x in lines)
    assert (tmp_path / "gates.safetensors").exists() and (tmp_path / "gate_config.json").exists()


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path):
    data = PackedSequences(random_docs(), 128, 256, seed=0)
    full = distill(settings(tmp_path / "full", steps=12, save_every=4), model=peaky_model(), data=data)
    # Stop after 6 steps (checkpoint at 4), then run the full 12 again in the same directory.
    part = settings(tmp_path / "cut", steps=12, save_every=4)
    _run_until(part, 6, data)
    resumed = distill(part, model=peaky_model(), data=data)
    assert resumed.losses == full.losses[4:]
    a = load_file(str(tmp_path / "full" / "gates.safetensors"))
    b = load_file(str(tmp_path / "cut" / "gates.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _run_until(s, stop_after, data):
    """Runs distillation but raises after `stop_after` steps, as a crash would."""
    import seerjax.train.distill as d

    real = d.make_train_step

    def counting(*args, **kw):
        step = real(*args, **kw)
        calls = {"n": 0}

        def wrapped(*a):
            calls["n"] += 1
            if calls["n"] > stop_after:
                raise KeyboardInterrupt
            return step(*a)

        return wrapped

    d.make_train_step = counting
    try:
        with pytest.raises(KeyboardInterrupt):
            distill(s, model=peaky_model(), data=data)
    finally:
        d.make_train_step = real


def _write_tiny_checkpoint(path, text_path):
    from seerjax import save_pretrained

    save_pretrained(peaky_model(), str(path))
    cfg = json.loads((path / "config.json").read_text())
    cfg["seerjax_tokenizer"] = "bytes"
    (path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    text_path.write_text(" ".join(rng.choice(words, size=6000)))


def _cli(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "seerjax", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_kill_9_then_resume_gives_bit_identical_gates(tmp_path):
    model_dir, text = tmp_path / "model", tmp_path / "data.txt"
    model_dir.mkdir()
    _write_tiny_checkpoint(model_dir, text)
    common = ["distill", "--model", str(model_dir), "--data", str(text), "--seq-len", "128", "--steps", "16",
              "--batch", "2", "--block-size", "16", "--d-gate", "32", "--save-every", "3", "--lr", "0.01",
              "--warmup", "2", "--dtype", "float32", "--implementation", "reference", "--no-progress"]
    ref = _cli(common + ["--out", str(tmp_path / "ref")])
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    cut_dir = tmp_path / "cut"
    proc = _cli(common + ["--out", str(cut_dir)])
    metrics = cut_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut_dir / "gates.safetensors").exists(), "the run finished before it was killed"
    again = _cli(common + ["--out", str(cut_dir)])
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    a, b = load_file(str(tmp_path / "ref" / "gates.safetensors")), load_file(str(cut_dir / "gates.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    ref_steps = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    cut_steps = [json.loads(x) for x in open(metrics)]
    assert [x["step"] for x in cut_steps] == list(range(1, 17))
    assert [x["loss"] for x in cut_steps] == [x["loss"] for x in ref_steps]
    # Run again when finished: nothing left to train, the same gates written again; fewer steps than the
    # checkpoint holds are refused by name.
    done = _cli(common + ["--out", str(cut_dir)])
    out, _ = done.communicate(timeout=600)
    assert done.returncode == 0 and "is already at step 16" in out, out
    for k, v in load_file(str(cut_dir / "gates.safetensors")).items():
        np.testing.assert_array_equal(a[k], v)
    fewer = _cli([*common[:common.index("--steps")], "--steps", "12", *common[common.index("--steps") + 2:],
                  "--out", str(cut_dir)])
    out, _ = fewer.communicate(timeout=600)
    assert fewer.returncode != 0 and "is at step 16, past steps=12" in out, out


def test_gates_from_distillation_load_into_a_fresh_model(tmp_path):
    from seerjax.gates_io import load_gates, model_gates

    data = PackedSequences(random_docs(), 128, 256, seed=0)
    model = peaky_model()
    distill(settings(tmp_path, steps=3), model=model, data=data)
    fresh = peaky_model()
    cfg = load_gates(fresh, str(tmp_path))
    assert cfg.block_size == 16 and cfg.d_gate == 32
    for g1, g2 in zip(model_gates(model), model_gates(fresh)):
        np.testing.assert_array_equal(np.asarray(g1.mask_linear_k[...]), np.asarray(g2.mask_linear_k[...]))
    # Gates of a model with other heads are refused.
    other = LlamaModel(ModelConfig(**{**TINY, "num_heads": 8, "num_kv_heads": 4, "hidden_size": 128}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_q_heads"):
        load_gates(other, str(tmp_path))


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(DistillError, match="seq_len=8 is shorter than one gate block"):
        settings(tmp_path, seq_len=8)
    with pytest.raises(DistillError, match="steps"):
        settings(tmp_path, steps=0)
    with pytest.raises(DistillError, match="lr"):
        settings(tmp_path, lr=-1.0)
    with pytest.raises(DistillError, match="retrieval_docs must be an integer >= 0, got -3"):
        settings(tmp_path, retrieval_docs=-3)
    with pytest.raises(ValueError, match="heads"):
        distill(settings(tmp_path, gate_heads="both"), model=peaky_model(), data=PackedSequences(random_docs(), 128, 256))
    with pytest.raises(DistillError, match="seq_len"):
        distill(settings(tmp_path), model=peaky_model(), data=PackedSequences(random_docs(), 64, 256))


def test_cli_errors_are_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    model_dir, text = tmp_path / "model", tmp_path / "data.txt"
    model_dir.mkdir()
    _write_tiny_checkpoint(model_dir, text)
    base = ["distill", "--model", str(model_dir), "--seq-len", "128", "--steps", "2", "--out", str(tmp_path / "o"),
            "--block-size", "16", "--d-gate", "32", "--implementation", "reference", "--no-progress"]
    p = _cli(base + ["--data", str(empty)])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "holds no" in out and "Traceback" not in out
    p = _cli(base[:5] + ["--data", str(text), "--seq-len", "4", "--steps", "2", "--out", str(tmp_path / "o"), "--block-size", "16"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "shorter than one gate block" in out
    p = _cli(["distill", "--model", str(tmp_path / "missing"), "--data", str(text), "--seq-len", "128", "--steps", "1", "--out", str(tmp_path / "o")])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2 and "does not exist" in out and "Traceback" not in out


def test_retrieval_documents_are_mixed_into_the_gate_data(tmp_path):
    """`--retrieval-docs N` adds N synthetic documents, each packed whole into the sequences."""
    from seerjax.train.data import ByteTokenizer, packed_from_source

    text = tmp_path / "doc.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    plain = packed_from_source(str(text), ByteTokenizer(), 256, seed=0)
    mixed = packed_from_source(str(text), ByteTokenizer(), 256, seed=0, retrieval_docs=6)
    assert len(mixed.docs) == len(plain.docs) and len(mixed.whole) == 6
    synthetic = b"".join(bytes(d.astype("uint8")) for d in mixed.whole)
    assert b"The pass key is" in synthetic and b"The value of key" in synthetic
    packed = b"".join(bytes(mixed.sequence(i).astype("uint8")) for i in range(mixed.per_epoch))
    assert all(bytes(w.astype("uint8")) in packed for w in mixed.whole)


def test_warm_start_continues_from_trained_gates_and_checks_their_settings(tmp_path):
    data = PackedSequences(random_docs(), 128, 256, seed=0)
    first = distill(settings(tmp_path / "first", steps=30), model=peaky_model(), data=data)
    fresh_loss = first.losses[0]
    warm = distill(settings(tmp_path / "warm", steps=3, lr=1e-4, init_gates=str(tmp_path / "first")), model=peaky_model(), data=data)
    # The warm start's first step sees trained gates: its loss is near where the first run ended, far below a fresh start.
    assert warm.losses[0] < 0.7 * fresh_loss, (warm.losses[0], fresh_loss)
    assert warm.losses[0] < 1.5 * np.mean(first.losses[-5:]), (warm.losses[0], first.losses[-5:])
    meta = json.loads((tmp_path / "warm" / "gate_config.json").read_text())
    assert meta["extra"]["init_gates"] == str(tmp_path / "first")
    # A finer scoring grain keeps the tensors: the same gates warm-start it, and it is what the new gates record.
    fine = distill(settings(tmp_path / "fine", steps=3, lr=1e-4, q_sub_blocks=4, k_sub_blocks=2,
                            init_gates=str(tmp_path / "first")), model=peaky_model(), data=data)
    trained, moved = load_file(str(tmp_path / "first" / "gates.safetensors")), load_file(str(tmp_path / "fine" / "gates.safetensors"))
    assert trained.keys() == moved.keys()
    for name in trained:  # 3 AdamW steps at lr 1e-4 move each weight by at most 3e-4
        np.testing.assert_allclose(moved[name], trained[name], atol=5e-4)
    assert fine.losses[0] < fresh_loss, (fine.losses[0], fresh_loss)
    meta = json.loads((tmp_path / "fine" / "gate_config.json").read_text())
    assert (meta["q_sub_blocks"], meta["k_sub_blocks"]) == (4, 2)
    with pytest.raises(DistillError, match="init_gates=.*other settings.*d_gate"):
        distill(settings(tmp_path / "other", steps=2, d_gate=16, init_gates=str(tmp_path / "first")), model=peaky_model(), data=data)
    with pytest.raises(DistillError, match="init_gates=.*not a directory"):
        distill(settings(tmp_path / "none", steps=2, init_gates=str(tmp_path / "missing")), model=peaky_model(), data=data)


def test_cli_flags_map_onto_settings_and_a_bad_skip_fraction_is_named():
    import argparse

    from seerjax.commands.distill import add_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["--model", "m", "--data", "d", "--seq-len", "256", "--steps", "3", "--out", "o"]
    s = settings_from_args(p.parse_args(base))
    assert s.skip_fraction == 0.25 and s.init_gates is None
    s = settings_from_args(p.parse_args(base + ["--skip-fraction", "0", "--init-gates", "g"]))
    assert s.skip_fraction == 0.0 and s.init_gates == "g"
    with pytest.raises(DistillError, match=r"skip_fraction must be in \[0, 1\), got 1.0"):
        settings_from_args(p.parse_args(base + ["--skip-fraction", "1.0"]))
    s = settings_from_args(p.parse_args(base + ["--q-sub-blocks", "4", "--k-sub-blocks", "2"]))
    assert (s.q_sub_blocks, s.k_sub_blocks) == (4, 2)
    with pytest.raises(DistillError, match=r"q_sub_blocks must be a positive integer dividing block_size \(64\), got 3"):
        settings_from_args(p.parse_args(base + ["--q-sub-blocks", "3"]))


def test_a_nan_loss_stops_distillation_before_its_step_is_saved(tmp_path, monkeypatch):
    """Losses are read one step late (LaggedSteps), but a step's loss is checked before its checkpoint: a NaN at
    step 2 raises by name, and the checkpoint and metrics stop at step 1."""
    import seerjax.train.distill as distill_module
    from seerjax.train.checkpoints import checkpoint_manager

    make = distill_module.make_train_step

    def make_nan_at_step_2(*args):
        step_fn, calls = make(*args), []

        def wrapped(gates, opt_state, frozen, tokens):
            calls.append(1)
            gates, opt_state, loss = step_fn(gates, opt_state, frozen, tokens)
            return gates, opt_state, loss * (jnp.nan if len(calls) == 2 else 1.0)

        return wrapped

    monkeypatch.setattr(distill_module, "make_train_step", make_nan_at_step_2)
    data = PackedSequences(random_docs(), 128, 256, seed=0)
    with pytest.raises(DistillError, match="distillation loss became nan at step 2"):
        distill(settings(tmp_path, steps=4, save_every=1), model=peaky_model(), data=data)
    assert checkpoint_manager(str(tmp_path)).latest_step() == 1
    assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [1]


def test_lagged_steps_hand_on_each_step_once_in_order_one_step_late():
    from seerjax.train.steps import LaggedSteps

    seen = []
    lagged = LaggedSteps(lambda done, loss, seconds: seen.append((done, loss, seconds >= 0)))
    lagged.push(1, jnp.float32(0.5))
    assert seen == []  # step 1 waits for step 2's dispatch
    lagged.push(2, jnp.float32(0.25))
    assert seen == [(1, 0.5, True)]
    lagged.flush()
    lagged.flush()  # nothing pending: no second call
    lagged.push(3, np.float32(2.0))
    lagged.flush()
    assert seen == [(1, 0.5, True), (2, 0.25, True), (3, 2.0, True)]
