"""The model against transformers: logits, config forms, HF round trip, sharded and bfloat16 checkpoints,
host memory while loading, the attention seam, and (GPU) a Llama-3.1-8B-shaped 32k prefill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import seerjax
from hf_fixtures import (
    KINDS,
    assert_logits_close,
    hf_logits,
    jax_logits,
    load_hf_model,
    make_hf_model,
    random_ids,
    to_transformers4_form,
)
from seerjax import LlamaModel, ModelConfig
from seerjax.attention import ATTENTION_FNS, AttentionOutputs, register_attention, reference_attention
from seerjax.config import RopeConfig
from seerjax.hf import param_to_hf_key
from seerjax.model import random_model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (directory, HF model); built once per kind, float32."""
    cache = {}

    def get(kind):
        if kind not in cache:
            path = tmp_path_factory.mktemp(kind)
            cache[kind] = (path, make_hf_model(path, kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoints):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = seerjax.from_pretrained(checkpoints(kind)[0], dtype="float32")
        return cache[kind]

    return get


@pytest.mark.parametrize("length", [1, 63, 64, 129])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_transformers(kind, length, checkpoints, loaded):
    _, hf = checkpoints(kind)
    ids = random_ids(2, length, seed=length)
    assert_logits_close(jax_logits(loaded(kind), ids), hf_logits(hf, ids))


@pytest.mark.parametrize("kind", ["llama3", "llama_yarn", "llama_tied", "qwen2"])
def test_transformers4_config_json_loads_the_same_model(kind, checkpoints, loaded, tmp_path):
    src, hf = checkpoints(kind)
    for name in os.listdir(src):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    d = to_transformers4_form(tmp_path)
    assert "rope_parameters" not in d and "rope_theta" in d
    old = seerjax.from_pretrained(tmp_path, dtype="float32")
    assert old.config == loaded(kind).config
    if kind == "llama_yarn":  # the config decides the model; run one to be sure
        ids = random_ids(1, 129)
        assert_logits_close(jax_logits(old, ids), hf_logits(hf, ids))


def test_right_padding_and_last_only(checkpoints, loaded):
    _, hf = checkpoints("llama3")
    model = loaded("llama3")
    lengths = np.array([64, 40, 1], np.int32)
    ids = random_ids(3, 64, seed=7)
    logits = jax_logits(model, ids, lengths=jnp.asarray(lengths))
    last = jax_logits(model, ids, lengths=jnp.asarray(lengths), last_only=True)
    assert logits.dtype == np.float32 and last.shape == (3, 256)
    for b, n in enumerate(lengths):
        expected = hf_logits(hf, ids[b : b + 1, :n])[0]
        assert_logits_close(logits[b, :n], expected)
        np.testing.assert_allclose(last[b], logits[b, n - 1], rtol=1e-5, atol=1e-6)
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])
def test_round_trip_through_transformers(kind, checkpoints, loaded, tmp_path):
    src, hf = checkpoints(kind)
    seerjax.save_pretrained(loaded(kind), tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == hf.config.model_type and saved["dtype"] == "float32"
    original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key], err_msg=key)
    reloaded = load_hf_model(tmp_path)
    ids = random_ids(2, 33)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(hf, ids))
    assert seerjax.from_pretrained(tmp_path, dtype="float32").config == loaded(kind).config


def test_save_pretrained_leaves_attached_gates_out(checkpoints, tmp_path):
    class Gate(nnx.Module):
        def __init__(self):
            self.mask_linear_k = nnx.Param(jnp.ones((4, 48, 16)))

    model = seerjax.from_pretrained(checkpoints("llama3")[0], dtype="float32")
    for layer in model.layers:
        layer.attn.gate = Gate()
    seerjax.save_pretrained(model, tmp_path)
    assert sorted(load_file(tmp_path / "model.safetensors")) == sorted(load_file(checkpoints("llama3")[0] / "model.safetensors"))


def _params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_sharded_checkpoints_load_and_save(checkpoints, loaded, tmp_path):
    _, hf = checkpoints("qwen3")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    sharded = seerjax.from_pretrained(tmp_path / "hf", dtype="float32")
    reference = _params(loaded("qwen3"))
    got = _params(sharded)
    assert got.keys() == reference.keys()
    for p in reference:
        np.testing.assert_array_equal(got[p], reference[p])

    seerjax.save_pretrained(sharded, tmp_path / "ours", max_shard_size=60_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "ours" / "model.safetensors").exists()
    ids = random_ids(1, 17)
    np.testing.assert_array_equal(hf_logits(load_hf_model(tmp_path / "ours"), ids), hf_logits(hf, ids))


def test_bfloat16_checkpoint_loads_bit_exact(tmp_path):
    hf = make_hf_model(tmp_path, "llama_tied", dtype=torch.bfloat16)
    model = seerjax.from_pretrained(tmp_path)  # dtype defaults to bfloat16
    assert model.dtype == jnp.bfloat16
    params = _params(model)
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [Hq*D, E]
    ours = params[("layers", 1, "attn", "q_proj")].astype(np.float32)  # [E, Hq, D]
    np.testing.assert_array_equal(ours.reshape(ours.shape[0], -1).T, q)
    f32 = seerjax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert _params(f32)[("embed",)].dtype == np.float32


def test_every_parameter_has_logical_axes():
    config = ModelConfig("qwen3", 64, 32, 48, 2, 4, 2, 16, attention_bias=True, attention_out_bias=True, qk_norm=True)
    model = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
    known = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp"}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.shape) and set(axes) <= known, (path, axes)
        param_to_hf_key(tuple(path))  # and an HF name
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    assert tuple(specs["layers"][0]["attn"]["k_proj"].value) == ("embed", "kv_heads", "head_dim")


# -- the attention seam ---------------------------------------------------------------------------


def test_attention_functions_plug_in_per_layer(checkpoints, loaded):
    _, hf = checkpoints("llama3")
    model = loaded("llama3")
    seen = []

    def spy(inputs):
        seen.append((inputs.layer, inputs.q.shape, inputs.k.shape, inputs.q_nope.shape, inputs.gate, dict(inputs.config)))
        out = reference_attention(inputs)
        return AttentionOutputs(out.out, {"q_norm": jnp.linalg.norm(inputs.q_nope.astype(jnp.float32))})

    register_attention("test_spy", spy, overwrite=True)
    try:
        ids = random_ids(1, 16)
        logits, aux = model.forward(ids, attention=["reference", "test_spy"], attention_config={"block_size": 64})
        assert [s[0] for s in seen] == [1]
        assert seen[0][1:4] == ((1, 16, 4, 16), (1, 16, 1, 16), (1, 16, 4, 16))
        assert seen[0][4] is None and seen[0][5] == {"block_size": 64}
        assert aux[0] == {} and float(aux[1]["q_norm"]) > 0
        with jax.default_matmul_precision("highest"):
            assert_logits_close(np.asarray(model(ids, attention="test_spy")), hf_logits(hf, ids))
        model.attention = "test_spy"
        assert model.forward(ids, return_aux=True)[1][0]["q_norm"] > 0
        hidden, aux = model.hidden_states(ids)
        assert hidden.shape == (1, 16, 64) and len(aux) == 2
        np.testing.assert_allclose(model.logits(hidden), logits, rtol=1e-6, atol=1e-6)
    finally:
        model.attention = "reference"
        ATTENTION_FNS.pop("test_spy")


def test_attention_names_are_checked(loaded):
    model = loaded("llama3")
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="no_such_attention"):
        model(ids, attention="no_such_attention")
    with pytest.raises(ValueError, match="one per layer"):
        model(ids, attention=["reference"])
    with pytest.raises(ValueError, match="already registered"):
        register_attention("reference", lambda inputs: None)
    with pytest.raises(ValueError, match="input_ids"):
        model(np.zeros((4,), np.int32))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error")
def test_cudnn_attention_on_cpu_is_a_clear_error(loaded):
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        loaded("llama3")(random_ids(1, 4), attention="cudnn")


# -- host memory while loading ----------------------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import jax, jax.numpy as jnp
    import seerjax
    from flax import nnx
    jnp.zeros(8).block_until_ready()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = seerjax.from_pretrained(sys.argv[1], dtype=jnp.bfloat16)
    jax.block_until_ready(nnx.state(model))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
    print(json.dumps({"base_kib": base, "peak_kib": peak, "hwm": hwm}))
    """
)


_SPAWN = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def test_loading_a_bfloat16_checkpoint_needs_no_second_copy(tmp_path):
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=4)
    with torch.device("cpu"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path)
    del hf
    nbytes = os.path.getsize(tmp_path / "model.safetensors")
    assert nbytes >= 200e6
    # Linux carries ru_maxrss across fork and exec, so a child of this (large) pytest process would start with
    # pytest's peak as its own; a small intermediate process gives the measuring process a clean count.
    run = subprocess.run(
        [sys.executable, "-c", _SPAWN, sys.executable, "-c", _MEASURE, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (rss["peak_kib"] - rss["base_kib"]) * 1024
    print(f"checkpoint {nbytes / 1e6:.0f} MB, peak RSS growth while loading {grown / 1e6:.0f} MB", rss)
    assert grown <= 1.3 * nbytes + 500e6


# -- GPU --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_llama31_8b_shape_32k_prefill_with_cudnn():
    """Llama-3.1-8B sizes, random bf16 weights made on the device, one 32k-token prefill (last-token logits)."""
    config = ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope=RopeConfig("llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
        attention="cudnn",
    )
    device = jax.devices()[0]
    start = time.perf_counter()
    model = random_model(config, dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    print(f"\ninit {time.perf_counter() - start:.1f} s, weights {device.memory_stats()['bytes_in_use'] / 2**30:.2f} GiB")

    @jax.jit
    def prefill(state, ids):
        return nnx.merge(graphdef, state)(ids, last_only=True)

    ids = jax.random.randint(jax.random.key(0), (1, 32768), 0, config.vocab_size, jnp.int32)
    start = time.perf_counter()
    compiled = prefill.lower(state, ids).compile()
    print(f"compile {time.perf_counter() - start:.1f} s")
    logits = jax.block_until_ready(compiled(state, ids))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, ids))
        times.append(time.perf_counter() - start)
    stats = device.memory_stats()
    print(
        f"32k prefill (last_only, cudnn): median {1e3 * sorted(times)[1]:.1f} ms over 3 runs; "
        f"peak GPU memory {stats['peak_bytes_in_use'] / 2**30:.2f} GiB of {stats.get('bytes_limit', 0) / 2**30:.1f} GiB"
    )
    assert logits.shape == (1, config.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all())
