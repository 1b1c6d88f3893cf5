"""Every way a checkpoint can be wrong gives a ValueError (or FileNotFoundError) naming the culprit."""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import seerjax
from hf_fixtures import make_hf_model
from seerjax.errors import CheckpointError, ConfigError

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine")
    make_hf_model(path, "llama_tied")
    return path


@pytest.fixture
def ckpt(pristine, tmp_path):
    """A fresh copy of a valid tiny checkpoint, to break."""
    path = tmp_path / "ckpt"
    shutil.copytree(pristine, path)
    return path


def _edit_tensors(path, edit):
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def _edit_config(path, **changes):
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def test_valid_checkpoint_loads(ckpt):
    assert seerjax.from_pretrained(ckpt, dtype="float32").config.num_layers == 2


def test_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        seerjax.from_pretrained(missing)
    with pytest.raises(ValueError, match="does not exist"):  # also a ValueError
        seerjax.from_pretrained(missing)


def test_path_is_a_file(ckpt):
    with pytest.raises(ValueError, match="must be a directory"):
        seerjax.from_pretrained(ckpt / "config.json")


def test_missing_config_json(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        seerjax.from_pretrained(ckpt)


def test_config_json_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        seerjax.from_pretrained(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="mistral")
    with pytest.raises(ValueError, match="model_type 'mistral'") as e:
        seerjax.from_pretrained(ckpt)
    assert "config.json" in str(e.value)


def test_unsupported_config_value(ckpt):
    _edit_config(ckpt, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        seerjax.from_pretrained(ckpt)


def test_missing_weights_file(ckpt):
    os.remove(ckpt / WEIGHTS)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        seerjax.from_pretrained(ckpt)


def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        seerjax.from_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.extra\.weight in .*model\.safetensors"):
        seerjax.from_pretrained(ckpt)


def test_tensor_of_a_layer_the_config_does_not_have(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.2\.input_layernorm\.weight.*2 layers"):
        seerjax.from_pretrained(ckpt)


def test_ignored_buffers_and_tied_lm_head_are_accepted(ckpt):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    _edit_tensors(ckpt, edit)
    seerjax.from_pretrained(ckpt, dtype="float32")


def test_mis_shaped_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight in .* has shape \(64, 32\), expected \(64, 64\)"):
        seerjax.from_pretrained(ckpt)


def test_non_float_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": np.ones(64, np.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight .* dtype I32"):
        seerjax.from_pretrained(ckpt)


@pytest.mark.parametrize("dtype,shown", [("float8", "'float8'"), ("int32", "'int32'"), ("bf15", "'bf15'"), (jnp.int8, "int8"), (None, "None")])
def test_unknown_dtype(ckpt, dtype, shown):
    with pytest.raises(ValueError, match="dtype must be one of") as e:
        seerjax.from_pretrained(ckpt, dtype=dtype)
    assert f"got {shown}" in str(e.value)


def test_dtype_names_are_accepted(ckpt):
    assert seerjax.from_pretrained(ckpt, dtype="float16").param_dtype == jnp.float16


def test_unknown_override(ckpt):
    with pytest.raises(ValueError, match="not_a_field"):
        seerjax.from_pretrained(ckpt, not_a_field=1)


def test_truncated_safetensors(ckpt):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        seerjax.from_pretrained(ckpt)


def test_corrupt_safetensors_header(ckpt):
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        seerjax.from_pretrained(ckpt)


def test_not_a_safetensors_file(ckpt):
    (ckpt / WEIGHTS).write_bytes(b"\x00" * 4)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        seerjax.from_pretrained(ckpt)


def test_sharded_checkpoint_missing_a_shard(ckpt):
    tensors = load_file(ckpt / WEIGHTS)
    os.remove(ckpt / WEIGHTS)
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: tensors[k] for k in keys[:5]}, ckpt / names[0], metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: names[0] if i < 5 else names[1] for i, k in enumerate(keys)}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        seerjax.from_pretrained(ckpt)


def test_corrupt_index(ckpt):
    os.remove(ckpt / WEIGHTS)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="index.json.*weight_map"):
        seerjax.from_pretrained(ckpt)


def test_save_pretrained_errors(ckpt, tmp_path):
    model = seerjax.from_pretrained(ckpt, dtype="float32")
    with pytest.raises(ValueError, match="max_shard_size"):
        seerjax.save_pretrained(model, tmp_path / "out", max_shard_size="lots")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        seerjax.save_pretrained(model, tmp_path / "file")
    with pytest.raises(ValueError, match="LlamaModel"):
        seerjax.save_pretrained({"embed": 1}, tmp_path / "out")
