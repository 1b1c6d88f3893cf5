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
