"""ModelConfig parsing and validation, and RoPE frequencies against transformers' own formulas."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hf_fixtures import KINDS, hf_config, to_transformers4_form
from seerjax import ModelConfig
from seerjax.config import RopeConfig
from seerjax.errors import ConfigError
from seerjax.rope import rope_frequencies

# config.json of meta-llama/Llama-3.1-8B (transformers 4 form), as published.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def test_llama31_8b_config_json():
    c = ModelConfig.from_hf_dict(LLAMA31_8B)
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size) == ("llama", 128256, 4096, 14336)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 32, 8, 128, 4)
    assert c.rms_norm_eps == 1e-5 and c.max_position_embeddings == 131072
    assert c.rope == RopeConfig("llama3", 500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    assert not (c.attention_bias or c.attention_out_bias or c.qk_norm or c.tie_word_embeddings)
    assert c.extra_dict["bos_token_id"] == 128000 and "torch_dtype" not in c.extra_dict
    hash(c)  # jit-static


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_both_config_forms_parse_alike(kind, tmp_path):
    hf = hf_config(kind)
    hf.save_pretrained(tmp_path)
    new = ModelConfig.from_json(tmp_path)
    to_transformers4_form(tmp_path)
    old = ModelConfig.from_json(tmp_path / "config.json")
    assert old == new
    assert new.head_dim == getattr(hf, "head_dim", 16) and new.num_kv_heads == hf.num_key_value_heads
    assert new.tie_word_embeddings == hf.tie_word_embeddings
    assert new.qk_norm == (kind == "qwen3")
    assert new.attention_bias == (kind in ("qwen2", "llama_tied"))
    assert new.attention_out_bias == (kind == "llama_tied")


def test_legacy_rope_scaling_type_key():
    d = {**LLAMA31_8B, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_dict(d).rope == RopeConfig("linear", 500000.0, factor=2.0)
    d = {**LLAMA31_8B, "rope_scaling": None}
    assert ModelConfig.from_hf_dict(d).rope == RopeConfig("default", 500000.0)
    d = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    assert ModelConfig.from_hf_dict(d).rope.theta == 10000.0


def test_qwen3_head_dim_defaults_to_128_as_transformers():
    d = {k: v for k, v in hf_config("qwen3").to_dict().items() if k != "head_dim"}
    assert ModelConfig.from_hf_dict(d).head_dim == transformers.Qwen3Config(**d).head_dim == 128


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_to_hf_dict_round_trips_and_transformers_reads_it(kind, tmp_path):
    c = ModelConfig.from_hf_dict({**hf_config(kind).to_dict(), "seerattn_gate_type": "Qavg_Kmaxminavg"})
    d = c.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == c
    assert d["seerattn_gate_type"] == "Qavg_Kmaxminavg"
    (tmp_path / "config.json").write_text(json.dumps(d))
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(back) is type(hf_config(kind))
    assert back.rope_parameters["rope_type"] == c.rope.rope_type
    assert getattr(back, "head_dim", 16) == c.head_dim and back.tie_word_embeddings == c.tie_word_embeddings


def test_overrides_replace_fields_and_revalidate():
    c = ModelConfig.from_hf_dict(LLAMA31_8B, attention="cudnn", max_position_embeddings=32768)
    assert c.attention == "cudnn" and c.max_position_embeddings == 32768
    with pytest.raises(ValueError, match="max_positions"):
        ModelConfig.from_hf_dict(LLAMA31_8B, max_positions=4)
    with pytest.raises(ValueError, match="num_layers"):
        c.replace(num_layers=0)


_BAD = [
    ({"model_type": "mistral"}, "model_type", "mistral"),
    ({"hidden_act": "gelu"}, "hidden_act", "gelu"),
    ({"mlp_bias": True}, "mlp_bias", "True"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type", "dynamic"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type", "longrope"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}}, "low_freq_factor", "missing"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor", "missing"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "factor", "-2.0"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "high_freq_factor", "1.0"),
    ({"rope_scaling": "yes"}, "rope_scaling", "yes"),
    ({"rope_theta": "big"}, "rope_theta", "big"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "0.5"),
    ({"num_key_value_heads": 5}, "num_key_value_heads", "5"),
    ({"vocab_size": 10.5}, "vocab_size", "10.5"),
    ({"vocab_size": None}, "vocab_size", "missing"),
    ({"rms_norm_eps": 0}, "rms_norm_eps", "0"),
    ({"head_dim": 127}, "head_dim", "127"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3}, "hidden_size", "4096"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings", "no"),
    ({"attention_bias": 1}, "attention_bias", "1"),
]


@pytest.mark.parametrize("change,field,value", _BAD, ids=[f"{b[1]}={b[2]}" for b in _BAD])
def test_unsupported_values_raise_naming_field_and_value(change, field, value):
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dict({**LLAMA31_8B, **change})
    assert isinstance(e.value, ConfigError)
    assert field in str(e.value) and value in str(e.value)


def test_qwen_sliding_window_is_rejected_only_when_used():
    d = hf_config("qwen2").to_dict()
    ModelConfig.from_hf_dict({**d, "use_sliding_window": False, "sliding_window": 4096})
    with pytest.raises(ValueError, match="use_sliding_window"):
        ModelConfig.from_hf_dict({**d, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                                  "layer_types": None})
    with pytest.raises(ValueError, match="layer_types"):
        ModelConfig.from_hf_dict({**d, "layer_types": ["full_attention", "chunked_attention"]})


def test_unknown_keys_are_kept_not_rejected():
    c = ModelConfig.from_hf_dict({**LLAMA31_8B, "seerattn_gate_block_size": 64, "some_future_key": [1, 2]})
    assert c.extra_dict["seerattn_gate_block_size"] == 64 and c.extra_dict["some_future_key"] == [1, 2]


# -- RoPE -----------------------------------------------------------------------------------------

_ROPES = [
    dict(rope_type="default", rope_theta=10000.0),
    dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
    dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),  # Llama 3.2
    dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=32768),  # Qwen
    dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
         beta_slow=1, mscale=1.0, mscale_all_dim=1.0),  # DeepSeek style: attention factor 1
    dict(rope_type="yarn", rope_theta=10000.0, factor=16.0, original_max_position_embeddings=2048, mscale=0.707,
         mscale_all_dim=1.0, truncate=False),
    dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, original_max_position_embeddings=4096,
         attention_factor=0.8, beta_fast=8.0, beta_slow=0.5),
    dict(rope_type="yarn", rope_theta=10000.0, factor=None, original_max_position_embeddings=16384),  # from max positions
]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("params", _ROPES, ids=lambda p: p["rope_type"])
def test_rope_frequencies_match_transformers(params, head_dim):
    hf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                  max_position_embeddings=131072, rope_parameters=dict(params))
    init = ROPE_INIT_FUNCTIONS.get(params["rope_type"], LlamaRotaryEmbedding.compute_default_rope_parameters)
    expected, expected_scale = init(hf)
    c = ModelConfig.from_hf_dict(hf.to_dict())
    inv_freq, scale = rope_frequencies(c.rope, head_dim)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (head_dim // 2,)
    np.testing.assert_allclose(inv_freq, expected.numpy(), rtol=2e-6)
    assert scale == pytest.approx(expected_scale, rel=1e-6)


def test_rope_frequencies_serve_other_head_sizes():
    """The AttnGate's RoPE uses the model's rope fields with its own head size d_gate."""
    rope = ModelConfig.from_hf_dict(LLAMA31_8B).rope
    inv_64, _ = rope_frequencies(rope, 64)
    inv_128, _ = rope_frequencies(rope, 128)
    assert inv_64.shape == (32,) and inv_128.shape == (64,) and inv_64[0] == inv_128[0] == 1.0
    with pytest.raises(ValueError, match="head_dim"):
        rope_frequencies(rope, 63)


def test_rope_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RopeConfig().theta = 1.0
