"""AttnGate: pooling, shapes, block-causal masking, targets, loss, gate files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seerjax import gates_io
from seerjax.gate import (
    AttnGate,
    GateConfig,
    GateConfigError,
    gate_kl_loss,
    gate_targets,
    parse_gate_type,
    parse_grain,
    pool_blocks,
)


def _cfg(**kw):
    base = dict(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, d_gate=32)
    base.update(kw)
    return GateConfig(**base)


def test_pool_blocks_matches_numpy_loop_with_partial_and_padded_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 37, 3, 4)).astype(np.float32)
    lengths = np.array([37, 20])
    got = np.asarray(pool_blocks(jnp.asarray(x), 16, ("avg", "max", "min"), jnp.asarray(lengths)))
    assert got.shape == (2, 3, 3, 12)
    for b in range(2):
        for n in range(3):
            rows = x[b, n * 16 : min((n + 1) * 16, lengths[b])]
            if len(rows) == 0:
                np.testing.assert_array_equal(got[b, n], 0.0)
                continue
            want = np.concatenate([rows.mean(0), rows.max(0), rows.min(0)], axis=-1)
            np.testing.assert_allclose(got[b, n], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("heads", ["query", "kv"])
@pytest.mark.parametrize("d_gate", [32, 64])
def test_gate_shapes_and_block_causal_mask(heads, d_gate):
    cfg = _cfg(heads=heads, d_gate=d_gate)
    gate = AttnGate(cfg, rngs=nnx.Rngs(0))
    q = jax.random.normal(jax.random.key(0), (2, 50, 4, 32))
    k = jax.random.normal(jax.random.key(1), (2, 50, 2, 32))
    logits = gate(q, k, rope=None, lengths=jnp.array([50, 20]))
    hg = 4 if heads == "query" else 2
    assert logits.shape == (2, hg, 4, 4)
    allowed = np.asarray(logits) > -1e29
    causal = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(allowed[0], np.broadcast_to(causal, (hg, 4, 4)))
    # lengths 20: key blocks 0 and 1 hold valid tokens, 2 and 3 are padding.
    want = causal & (np.arange(4)[None, :] < 2)
    np.testing.assert_array_equal(allowed[1], np.broadcast_to(want, (hg, 4, 4)))
    assert np.isfinite(np.asarray(logits)).all()


def test_linear_layouts_follow_the_seed():
    # One Q pooling and d_gate == head_dim: no Q linear, K repeated to query heads before its linear.
    g = AttnGate(_cfg(d_gate=32), rngs=nnx.Rngs(0))
    assert g.mask_linear_q is None and g.mask_linear_k.shape == (4, 3 * 32, 32)
    # With a Q linear: K linear per KV head.
    g = AttnGate(_cfg(d_gate=64), rngs=nnx.Rngs(0))
    assert g.mask_linear_q.shape == (4, 32, 64) and g.mask_linear_k.shape == (2, 96, 64)
    g = AttnGate(_cfg(heads="kv"), rngs=nnx.Rngs(0))
    assert g.mask_linear_q.shape == (2, 2 * 32, 32) and g.mask_linear_k.shape == (2, 96, 32)


def test_gate_matches_explicit_computation():
    cfg = _cfg(d_gate=64)
    gate = AttnGate(cfg, rngs=nnx.Rngs(3))
    q = np.random.default_rng(1).normal(size=(1, 32, 4, 32)).astype(np.float32)
    k = np.random.default_rng(2).normal(size=(1, 32, 2, 32)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(gate(jnp.asarray(q), jnp.asarray(k), rope=None))
    wq, wk = np.asarray(gate.mask_linear_q[...]), np.asarray(gate.mask_linear_k[...])
    qp = q.reshape(1, 2, 16, 4, 32).mean(2)
    kp = k.reshape(1, 2, 16, 2, 32)
    kp = np.concatenate([kp.max(2), kp.min(2), kp.mean(2)], -1)
    qg = np.einsum("bnhi,hio->bnho", qp, wq)
    kg = np.repeat(np.einsum("bnhi,hio->bnho", kp, wk), 2, axis=2)
    want = np.einsum("bihd,bjhd->bhij", qg, kg) / 8.0
    np.testing.assert_allclose(got[0, :, 1, :], want[0, :, 1, :], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0, :, 0, 0], want[0, :, 0, 0], rtol=1e-4, atol=1e-4)


def _token_level_block_max(q, k, wq, wk, bs, length, causal=True):
    """Reference for single-token sub-blocks (avg pooling of one token = the token): each block's max over
    causally allowed, valid (query, key) token pairs of the gate's bilinear score, no RoPE."""
    b, t, hq, d = q.shape
    qg = np.einsum("bthi,hio->btho", q, wq)
    kg = np.repeat(np.einsum("bthi,hio->btho", k, wk), hq // k.shape[2], axis=2)
    s = np.einsum("bihd,bjhd->bhij", qg, kg) / np.sqrt(wq.shape[-1])
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    ok = (j <= i) if causal else np.ones((t, t), bool)
    ok = ok & (i < length) & (j < length)
    s = np.where(ok, s, -np.inf)
    n = -(-t // bs)
    s = np.pad(s, ((0, 0), (0, 0), (0, n * bs - t), (0, n * bs - t)), constant_values=-np.inf)
    return s.reshape(b, hq, n, bs, n, bs).max(axis=(3, 5))


@pytest.mark.parametrize("t,length", [(48, None), (45, None), (48, 27)])
def test_sub_blocks_take_each_blocks_best_causal_token_pair(t, length):
    """With one-token sub-blocks the gate's block logit is the max over the block's allowed token pairs."""
    cfg = _cfg(block_size=16, d_gate=32, q_pooling=("avg",), k_pooling=("avg",), q_sub_blocks=16, k_sub_blocks=16,
               force_double=True)
    gate = AttnGate(cfg, rngs=nnx.Rngs(4))
    rng = np.random.default_rng(5)
    q = rng.normal(size=(1, t, 4, 32)).astype(np.float32)
    k = rng.normal(size=(1, t, 2, 32)).astype(np.float32)
    lengths = None if length is None else jnp.asarray([length])
    got = np.asarray(gate(jnp.asarray(q), jnp.asarray(k), rope=None, lengths=lengths, score_dtype=jnp.float32))
    want = _token_level_block_max(q, k, np.asarray(gate.mask_linear_q[...]), np.asarray(gate.mask_linear_k[...]),
                                  16, t if length is None else length)
    n = want.shape[-1]
    allowed = np.tril(np.ones((n, n), bool))
    if length is not None:
        allowed = allowed & (np.arange(n)[None, :] * 16 < length)
    valid_rows = np.arange(n) * 16 < (t if length is None else length)
    for i in np.flatnonzero(valid_rows):
        np.testing.assert_allclose(got[0, :, i, allowed[i]], want[0, :, i, allowed[i]], rtol=1e-4, atol=1e-4)
    assert np.all(got[0][:, ~allowed] <= -1e29)  # disallowed blocks stay masked
    assert np.isfinite(got).all()


def test_sub_blocks_change_only_the_scoring_grain():
    """Finer grains keep the tensors and change the scores; a grain that does not divide the block, or the
    seed's file format (whole blocks only), is refused by name."""
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(2, 64, 4, 32)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, 64, 2, 32)).astype(np.float32))
    coarse = AttnGate(_cfg(), rngs=nnx.Rngs(7))
    fine = AttnGate(_cfg(q_sub_blocks=4, k_sub_blocks=2), rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(np.asarray(coarse.mask_linear_k[...]), np.asarray(fine.mask_linear_k[...]))
    a = np.asarray(coarse(q, k, rope=None, score_dtype=jnp.float32))
    b = np.asarray(fine(q, k, rope=None, score_dtype=jnp.float32))
    assert a.shape == b.shape == (2, 4, 4, 4)
    off = np.tril(np.ones((4, 4), bool), -1)  # strictly past blocks: every pair allowed, the max ≥ any pair's
    assert not np.allclose(a[..., off], b[..., off])
    with pytest.raises(GateConfigError, match="q_sub_blocks"):
        _cfg(q_sub_blocks=3)
    with pytest.raises(GateConfigError, match="k_sub_blocks"):
        _cfg(k_sub_blocks=0)
    with pytest.raises(GateConfigError, match="sub-blocks"):
        gates_io.gate_config_to_seed_fields(_cfg(q_sub_blocks=2))


@pytest.mark.parametrize("t,lengths", [(80, None), (75, (75, 40))])
def test_sub_block_scores_in_query_chunks_match_scoring_all_at_once(monkeypatch, t, lengths):
    """Past SCORE_BYTES the (XLA) sub-block scores go chunk by chunk: same logits, same gradients."""
    import seerjax.kernels.sub_block_scores as scores_mod

    cfg = _cfg(q_sub_blocks=4, k_sub_blocks=8, q_pooling=("avg", "max"))
    gate = AttnGate(cfg, rngs=nnx.Rngs(8))
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.normal(size=(2, t, 4, 32)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(2, t, 2, 32)).astype(np.float32))
    lens = None if lengths is None else jnp.asarray(lengths)
    rope = lambda x, pos: x * jnp.cos(pos[..., None, None] * 0.01)  # position-dependent, cheap

    def run():
        graphdef, params, rest = nnx.split(gate, nnx.Param, ...)

        def f(p):
            g = nnx.merge(graphdef, p, rest)
            out = g(q, k, rope=rope, lengths=lens, score_dtype=jnp.float32)
            return jnp.sum(jnp.where(out > -1e29, jnp.tanh(out), 0.0)), out

        (_, out), grads = jax.value_and_grad(f, has_aux=True)(params)
        return np.asarray(out), jax.tree.map(np.asarray, grads)

    whole, g_whole = run()
    monkeypatch.setattr(scores_mod, "SCORE_BYTES", 1)  # one query block per chunk
    chunked, g_chunked = run()
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("heads", ["query", "kv"])
def test_sub_block_gate_on_a_suffix_of_queries_gives_the_full_gates_last_rows(heads):
    """Chunked prefill (queries a block-aligned suffix of the keys, bottom-right aligned) and decoding one token
    score like the last rows of the whole sequence's gate: same sub-block pooling, RoPE positions and causal pairs."""
    from seerjax.config import RopeConfig
    from seerjax.rope import apply_rope, rope_frequencies

    cfg = _cfg(q_sub_blocks=4, k_sub_blocks=2, heads=heads, q_pooling=("avg", "max"))
    gate = AttnGate(cfg, rngs=nnx.Rngs(10))
    inv, sc = rope_frequencies(RopeConfig(theta=10000.0), cfg.d_gate)
    rope = lambda x, pos: apply_rope(x, pos, inv, sc)
    rng = np.random.default_rng(11)
    q = jnp.asarray(rng.normal(size=(1, 80, 4, 32)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(1, 80, 2, 32)).astype(np.float32))
    full = np.asarray(gate(q, k, rope=rope, score_dtype=jnp.float32))
    suffix = np.asarray(gate(q[:, 48:], k, rope=rope, score_dtype=jnp.float32))  # the last 2 of 5 query blocks
    np.testing.assert_allclose(suffix, full[:, :, 3:], rtol=1e-4, atol=1e-4)
    # One decoded token (the last): its block logit is the max over its own sub-block against every allowed key pair.
    one = np.asarray(gate(q[:, 79:], k, rope=rope, score_dtype=jnp.float32))
    assert one.shape[2] == 1 and np.isfinite(one).all()
    assert np.all(one[0, :, 0, :] > -1e29)  # every key block is visible to the last token


def test_targets_normalize_rows_and_take_group_max_for_kv_gates():
    pooled = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 4, 3, 3)).astype(np.float32))
    pooled = pooled * jnp.tril(jnp.ones((3, 3)))
    t = gate_targets(pooled, _cfg())
    np.testing.assert_allclose(np.asarray(t.sum(-1)), 1.0, rtol=1e-6)
    tk = gate_targets(pooled, _cfg(heads="kv"))
    grouped = np.asarray(pooled).reshape(1, 2, 2, 3, 3).max(2)
    np.testing.assert_allclose(np.asarray(tk), grouped / grouped.sum(-1, keepdims=True), rtol=1e-6)
    # An all-zero row (e.g. padding) stays zero, never NaN.
    z = gate_targets(jnp.zeros((1, 4, 2, 2)), _cfg())
    assert np.all(np.asarray(z) == 0)


def test_kl_loss_zero_at_target_and_finite_with_masked_logits():
    tgt = jnp.asarray([[[[1.0, 0.0], [0.25, 0.75]]]])
    logits = jnp.log(jnp.asarray([[[[1.0, 1e-30], [0.25, 0.75]]]]))
    logits = logits.at[0, 0, 0, 1].set(-1e30)
    assert float(gate_kl_loss(logits, tgt, skip_fraction=0.0)) == pytest.approx(0.0, abs=1e-6)
    worse = gate_kl_loss(jnp.zeros((1, 1, 2, 2)).at[0, 0, 0, 1].set(-1e30), tgt, skip_fraction=0.0)
    assert float(worse) > 0 and np.isfinite(float(worse))
    g = jax.grad(lambda x: gate_kl_loss(x, tgt, skip_fraction=0.0))(logits)
    assert np.isfinite(np.asarray(g)).all()


def test_bad_gate_settings_are_named():
    with pytest.raises(GateConfigError, match="block_size"):
        _cfg(block_size=48)
    with pytest.raises(GateConfigError, match="heads"):
        _cfg(heads="both")
    with pytest.raises(GateConfigError, match="k_pooling"):
        _cfg(k_pooling=("max", "median"))
    with pytest.raises(GateConfigError, match="gate_type"):
        parse_gate_type("avg_max")
    assert parse_gate_type("Qavg_Kmaxminavg") == (("avg",), ("max", "min", "avg"))
    assert parse_grain("8x4") == (8, 4)
    for bad in ("8", "0x4", "ax4", "8x8x8", "-1x2"):
        with pytest.raises(GateConfigError, match=f"QxK.*{bad!r}"):
            parse_grain(bad)


@pytest.mark.parametrize("d_gate,heads", [(32, "query"), (64, "query"), (32, "kv")])
def test_gate_files_round_trip(tmp_path, d_gate, heads):
    cfg = _cfg(d_gate=d_gate, heads=heads)
    gates = [AttnGate(cfg, rngs=nnx.Rngs(i)) for i in range(cfg.num_layers)]
    gates_io.save_gates(str(tmp_path), gates, cfg)
    cfg2 = gates_io.read_gate_config(str(tmp_path))
    assert cfg2 == cfg
    tensors = gates_io.load_gate_tensors(str(tmp_path), cfg2)
    for name, arr in gates_io.gate_tensors(gates, cfg).items():
        np.testing.assert_array_equal(tensors[name], arr)


def test_seed_format_round_trip(tmp_path):
    cfg = _cfg(d_gate=32)
    gates = [AttnGate(cfg, rngs=nnx.Rngs(i)) for i in range(2)]
    hf = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128, "head_dim": 32}
    gates_io.export_seed_format(str(tmp_path), gates, cfg, hf)
    seed_cfg = json.loads((tmp_path / "config.json").read_text())
    assert seed_cfg["seerattn_gate_type"] == "Qavg_Kmaxminavg"
    cfg2 = gates_io.read_gate_config(str(tmp_path))
    assert cfg2 == cfg
    tensors = gates_io.load_gate_tensors(str(tmp_path), cfg2)
    assert tensors["model.layers.1.self_attn.attn_gate.mask_linear_k.weight"].shape == (4, 96, 32)


def test_wrong_gate_files_are_refused(tmp_path):
    cfg = _cfg()
    gates = [AttnGate(cfg, rngs=nnx.Rngs(0)) for _ in range(2)]
    gates_io.save_gates(str(tmp_path), gates, cfg)
    with pytest.raises(GateConfigError, match="num_layers"):
        gates_io.check_gates_fit_model(cfg, num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(GateConfigError, match="missing tensors"):
        gates_io.load_gate_tensors(str(tmp_path), _cfg(num_layers=3))
    with pytest.raises(GateConfigError, match="shape"):
        gates_io.load_gate_tensors(str(tmp_path), _cfg(num_q_heads=8, num_kv_heads=4))
    with pytest.raises(FileNotFoundError):
        gates_io.read_gate_config(str(tmp_path / "nope"))
    (tmp_path / "gates.safetensors").write_bytes(b"garbage")
    with pytest.raises(GateConfigError, match="cannot read"):
        gates_io.load_gate_tensors(str(tmp_path), cfg)


def test_gates_load_at_another_scoring_grain_and_nothing_else_may_differ(tmp_path):
    """`load_gates(model, dir, config=)` attaches saved gates at another sub-block grain with the same tensors;
    a config that differs in anything else is refused by name."""
    from seerjax.config import ModelConfig
    from seerjax.model import LlamaModel

    mc = ModelConfig(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=32)
    cfg = _cfg(q_pooling=("avg", "max"))
    gates = [AttnGate(cfg, rngs=nnx.Rngs(i)) for i in range(cfg.num_layers)]
    gates_io.save_gates(str(tmp_path), gates, cfg)
    model = LlamaModel(mc, dtype=jnp.float32, rngs=nnx.Rngs(0))
    fine = _cfg(q_pooling=("avg", "max"), q_sub_blocks=4, k_sub_blocks=8)
    assert gates_io.load_gates(model, str(tmp_path), config=fine) == fine
    for layer, saved in zip(model.layers, gates):
        assert layer.attn.gate.config == fine
        np.testing.assert_array_equal(np.asarray(layer.attn.gate.mask_linear_k[...]), np.asarray(saved.mask_linear_k[...]))
    with pytest.raises(GateConfigError, match="more than q_sub_blocks / k_sub_blocks"):
        gates_io.load_gates(model, str(tmp_path), config=_cfg(q_pooling=("avg", "max"), d_gate=16))
