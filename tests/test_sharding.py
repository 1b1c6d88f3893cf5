"""Meshes, the sharding rules, per-device attention under shard_map, and checkpoints across mesh shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from seerjax import sharding as shd
from seerjax.attention import AttentionInputs, get_attention
from seerjax.config import ModelConfig
from seerjax.gate import AttnGate, GateParam, gate_kl_loss, gate_targets
from seerjax.gates_io import attach_gates, gate_config_for_model
from seerjax.model import LlamaModel

TINY = dict(model_type="llama", vocab_size=257, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32)


def test_conftest_gives_eight_cpu_devices():
    assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


def test_make_mesh_axes_sizes_and_fewer_devices_than_present():
    mesh = shd.make_mesh("data=2,fsdp=4,tensor=1")
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    small = shd.make_mesh("fsdp=2, tensor=2")
    assert dict(small.shape) == {"data": 1, "fsdp": 2, "tensor": 2} and small.size == 4
    assert shd.make_mesh(None).size == 1
    assert dict(shd.make_mesh("tensor=2,fsdp=-1").shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert shd.describe(mesh) == "data=2,fsdp=4,tensor=1"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=4,fsdp=4", "needs 16 devices, but only 8 are present"),
        ("data2", "malformed at 'data2'"),
        ("data=two", "malformed"),
        ("", "mesh must be a string"),
        ("pipeline=2", "unknown axis 'pipeline'"),
        ("data=2,data=2", "gives axis 'data' twice"),
        ("fsdp=0", "size >= 1"),
        ("fsdp=-1,data=-1", "only one axis may be -1"),
        ("fsdp=3,tensor=-1", "does not divide the 8 devices"),
    ],
)
def test_bad_meshes_are_clear_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(spec)


def _model_with_gates(**overrides):
    model = LlamaModel(ModelConfig(**{**TINY, **overrides}), dtype=jnp.float32, rngs=nnx.Rngs(0))
    attach_gates(model, gate_config_for_model(model.config, block_size=16, d_gate=32))
    return model


def test_rules_table_places_every_parameter():
    model = _model_with_gates()
    mesh = shd.make_mesh("fsdp=4,tensor=2")
    specs = shd.tree_specs(nnx.state(model), mesh)
    attn = specs["layers"][0]["attn"]
    assert attn["q_proj"].get_value() == P("fsdp", "tensor", None)
    assert attn["o_proj"].get_value() == P("tensor", None, "fsdp")
    assert specs["layers"][0]["mlp"]["down_proj"].get_value() == P("tensor", "fsdp")
    assert attn["gate"]["mask_linear_k"].get_value() == P("tensor", None, None)
    # The byte vocabulary (257) is not a multiple of tensor=2: the embedding keeps that dimension whole.
    assert specs["embed"].get_value() == P(None, "fsdp")
    shardings = shd.tree_shardings(nnx.state(model), mesh)
    placed = shd.put_tree(nnx.state(model), shardings)
    q = placed["layers"][0]["attn"]["q_proj"].get_value()
    assert q.sharding.spec == P("fsdp", "tensor", None) and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (16, 2, 32)


def test_parameters_that_do_not_divide_name_parameter_dim_and_axis():
    model = _model_with_gates()
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.k_proj dim 1 \(kv_heads, size 2\) is not divisible by mesh axis tensor=4"):
        shd.tree_specs(nnx.state(model), shd.make_mesh("fsdp=2,tensor=4"))
    odd = LlamaModel(ModelConfig(**{**TINY, "hidden_size": 36}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"parameter embed dim 1 \(embed, size 36\) is not divisible by mesh axis fsdp=8"):
        shd.tree_specs(nnx.state(odd), shd.make_mesh("fsdp=8"))


def test_batches_split_over_data_and_fsdp_or_fail_clearly():
    mesh = shd.make_mesh("data=2,fsdp=2,tensor=2")
    tokens = np.arange(3 * 8 * 16).reshape(3, 8, 16)
    placed = shd.put_batch(tokens, mesh, batch_dim=1)
    np.testing.assert_array_equal(np.asarray(placed), tokens)
    assert placed.sharding.spec == P(None, ("data", "fsdp"), None)
    assert placed.addressable_shards[0].data.shape == (3, 2, 16)
    with pytest.raises(ValueError, match=r"batch=6 must be divisible by data×fsdp = 4"):
        shd.check_batch(6, mesh)


def test_distributed_initialize_only_when_the_environment_asks():
    assert shd.maybe_initialize_distributed({}) is False
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        shd.maybe_initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=3 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        shd.maybe_initialize_distributed(
            {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "3"}
        )


def _attention_case(heads="query", grain=(1, 1)):
    import seerjax.train.finetune  # noqa: F401  (registers seer_train)

    mc = ModelConfig(**TINY)
    gc = gate_config_for_model(mc, block_size=16, d_gate=32, heads=heads, q_sub_blocks=grain[0], k_sub_blocks=grain[1])
    graphdef, gate_state = nnx.split(AttnGate(gc, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    b, t = 4, 64
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, 32)), jnp.float32) for h in (4, 2, 2))
    weights = jnp.asarray(rng.normal(size=(b, t, 4, 32)), jnp.float32)

    def loss(args, name, mesh, implementation):
        q, k, v, gate_state = args
        inputs = AttentionInputs(
            q=q * 2, k=k * 2, v=v, q_nope=q, k_nope=k, positions=jnp.broadcast_to(jnp.arange(t), (b, t)),
            lengths=None, layer=0, gate=nnx.merge(graphdef, gate_state), model_config=mc,
            config={"implementation": implementation, "density": 0.3, "mesh": mesh},
        )
        result = get_attention(name)(inputs)
        gate = gate_kl_loss(result.aux["gate_logits"], gate_targets(result.aux["pooled"], gc))
        return jnp.sum(result.out * weights) + gate + jnp.mean(result.aux["density"])

    return jax.jit(jax.value_and_grad(loss), static_argnums=(1, 2, 3)), (q, k, v, gate_state)


@pytest.mark.parametrize("heads, mesh_spec, implementation, grain", [
    ("query", "data=2,tensor=2", "reference", (1, 1)),
    ("kv", "fsdp=2,tensor=2", "pallas_interpret", (1, 1)),
    ("query", "fsdp=2,tensor=2", "reference", (4, 2)),  # gates scored at sub-block grain
])
def test_attention_per_device_matches_unsharded_values_and_gradients(heads, mesh_spec, implementation, grain):
    """Gate, TopK and kernels under shard_map (batch × heads) give the unsharded loss and gradients, gates included;
    the Pallas kernels run per device inside shard_map."""
    loss, args = _attention_case(heads, grain)
    mesh = shd.make_mesh(mesh_spec)
    ref_value, ref_grads = loss(args, "seer_train", None, "reference")
    value, grads = loss(args, shd.sharded_attention("seer_train"), mesh, implementation)
    np.testing.assert_allclose(float(value), float(ref_value), atol=5e-4)  # a sum of 32k products
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=5e-5)
    assert jax.tree.leaves(grads[3])[0].shape[0] == (4 if heads == "query" else 2)


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    from seerjax.train.finetune import FinetuneSettings, checkpoint_manager, restore_checkpoint, save_checkpoint, setup

    s = FinetuneSettings(model="unused", gates="unused", data="unused", seq_len=128, steps=4, out=str(tmp_path),
                         dtype="float32", implementation="reference")
    saved = setup(_model_with_gates(), s, shd.make_mesh("fsdp=4,tensor=2"))
    manager = checkpoint_manager(str(tmp_path))
    save_checkpoint(manager, 3, saved, {"step": 3})
    manager.wait_until_finished()

    fresh = _model_with_gates()
    for layer in fresh.layers:  # different values, same shapes: the restore must overwrite them
        layer.attn.q_proj[...] = layer.attn.q_proj[...] + 1.0
    target = setup(fresh, s, shd.make_mesh("data=2,fsdp=2,tensor=1"))
    meta = restore_checkpoint(checkpoint_manager(str(tmp_path)), 3, target)
    assert meta == {"step": 3}
    want = jax.tree.leaves((saved.trainable, saved.opt_state))
    got = jax.tree.leaves((target.trainable, target.opt_state))
    assert len(want) == len(got)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = target.trainable["params"]["layers"][0]["attn"]["q_proj"].get_value()
    assert q.sharding.mesh.shape["data"] == 2 and q.sharding.spec == P("fsdp", None, None)
    gate = target.trainable["gates"]["layers"][0]["attn"]["gate"]["mask_linear_k"].get_value()
    assert isinstance(target.trainable["gates"]["layers"][0]["attn"]["gate"]["mask_linear_k"], GateParam)
    assert gate.sharding.spec == P(None, None, None)


def _peaky_model():
    model = LlamaModel(ModelConfig(**TINY), dtype=jnp.float32, rngs=nnx.Rngs(0))
    for layer in model.layers:
        layer.attn.q_proj[...] = layer.attn.q_proj[...] * 30
        layer.attn.k_proj[...] = layer.attn.k_proj[...] * 30
    return model


def test_distillation_on_a_mesh_matches_one_device(tmp_path):
    from seerjax.train.data import PackedSequences
    from seerjax.train.distill import DistillSettings, distill

    rng = np.random.default_rng(0)
    data = PackedSequences([rng.integers(0, 256, size=300).astype(np.int32) for _ in range(10)], 128, 256)
    common = dict(model="unused", data="unused", seq_len=128, steps=3, batch=4, block_size=16, d_gate=32,
                  implementation="reference", warmup=1, progress=False, lr=1e-2, dtype="float32")
    one = distill(DistillSettings(out=str(tmp_path / "one"), **common), model=_peaky_model(), data=data)
    sharded = distill(DistillSettings(out=str(tmp_path / "mesh"), mesh="data=2,fsdp=2,tensor=2", **common),
                      model=_peaky_model(), data=data)
    np.testing.assert_allclose(sharded.losses, one.losses, rtol=1e-4)
    with pytest.raises(ValueError, match=r"batch=4 must be divisible by data×fsdp = 8"):
        distill(DistillSettings(out=str(tmp_path / "bad"), mesh="data=2,fsdp=4", **common), model=_peaky_model(), data=data)


def test_evaluation_on_a_mesh_matches_one_device(tmp_path):
    from seerjax.eval.harness import EvalSettings, run_eval
    from seerjax.gates_io import save_gates
    from seerjax.train.data import ByteTokenizer

    model = _peaky_model()
    gate_config = gate_config_for_model(model.config, block_size=16, d_gate=32)
    save_gates(str(tmp_path / "gates"), attach_gates(model, gate_config), gate_config)
    rng = np.random.default_rng(0)
    docs = [rng.integers(97, 123, size=400).astype(np.int32) for _ in range(4)]
    common = dict(model="unused", gates=str(tmp_path / "gates"), data="unused", seq_len=128, methods=("seer",),
                  densities=(0.5,), num_sequences=1, batch=1, retrieval_samples=1, retrieval_depths=(0.5,),
                  implementation="reference", dtype="float32", progress=False)
    runs = {}
    for mesh in (None, "fsdp=2,tensor=2"):
        s = EvalSettings(out=str(tmp_path / str(mesh)), mesh=mesh, **common)
        runs[mesh] = run_eval(s, model=_peaky_model(), heldout=docs, tokenizer=ByteTokenizer())
    for a, b in zip(runs[None], runs["fsdp=2,tensor=2"], strict=True):
        assert a["method"] == b["method"]
        for key in ("ppl", "achieved_density", "recall", "retrieval"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=key)
