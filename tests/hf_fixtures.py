"""Tiny random HF checkpoints built offline with transformers, and helpers to compare logits with them."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import torch
import transformers
from flax import nnx

# Small but structurally complete: GQA, several layers, head_dim 16 or 32 (explicit for qwen3).
_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)

KINDS = {
    # Llama 3.1 style: GQA 4:1, llama3 rope scaling (original context 32, so positions < 256 cross the bands).
    "llama3": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # YaRN with non-default beta and mscale fields, and attention_factor inferred from them.
    "llama_yarn": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=16.0,
                beta_slow=2.0,
                mscale=1.0,
                mscale_all_dim=0.5,
            ),
        ),
    ),
    # Llama 3.2 style tied embeddings; attention_bias gives q, k, v and o biases in Llama.
    "llama_tied": (
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
            attention_bias=True,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        ),
    ),
    # Qwen2: q/k/v biases, no o_proj bias, tied embeddings (as the small Qwen2 models).
    "qwen2": (
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
             rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
    # Qwen3: q/k RMSNorm, explicit head_dim (32) != hidden_size / heads (16).
    "qwen3": (
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
             rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
    ),
}


def hf_config(kind: str, **overrides):
    cls, kw = KINDS[kind]
    return cls(**{**_BASE, **kw, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values in every parameter (HF's init leaves biases at 0 and norms at 1, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_((1.0 + 0.1 * noise) if "norm" in name else 0.05 * noise)


def make_hf_model(path, kind: str, *, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Builds a random HF model of ``kind``, saves it to ``path`` and returns it (eval mode, eager attention)."""
    config = hf_config(kind, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model = model.to(dtype).eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(os.fspath(path), **kw)
    return model


def load_hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(path), attn_implementation="eager", dtype=torch.float32
    ).eval()


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def jax_logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    """``model(ids, **kwargs)`` under one ``jax.jit`` of the split model (float32 "highest" matmuls)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        return nnx.merge(graphdef, state)(ids, **kwargs)

    with jax.default_matmul_precision("highest"):
        return np.asarray(run(state, ids))


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """max |actual - expected| <= rel * max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} * max|logit| {scale:.3g}"


def random_ids(batch: int, length: int, vocab: int = _BASE["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def to_transformers4_form(path) -> dict:
    """Rewrites config.json from ``rope_parameters`` to the transformers-4 ``rope_theta`` + ``rope_scaling`` form."""
    file = os.path.join(os.fspath(path), "config.json")
    with open(file) as f:
        d = json.load(f)
    params = dict(d.pop("rope_parameters"))
    d["rope_theta"] = params.pop("rope_theta")
    rope_type = params.pop("rope_type")
    # transformers 4 wrote the scaling dict (legacy "type" key in older files) or null without scaling.
    d["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **params}
    with open(file, "w") as f:
        json.dump(d, f, indent=2)
    return d
