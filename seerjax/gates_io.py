"""Gate files: `gates.safetensors` + `gate_config.json`, and the seed's published AttnGate format.

Tensor names are the seed's (`model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight`, and
`...mask_linear_q.weight` when a Q linear exists), each `[heads, in, d_gate]`, so gates move between
seerjax and the original SeerAttention both ways. The seed describes its gates with `seerattn_*`
fields of the model's config.json; seerjax writes a `gate_config.json` that holds everything
(block size, poolings, head mode, d_gate and the model's shape) and reads either.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from seerjax.gate import GateConfig, GateConfigError, parse_gate_type

GATES_FILE = "gates.safetensors"
GATE_CONFIG_FILE = "gate_config.json"
_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_gate\.(mask_linear_q|mask_linear_k)\.weight$")


def tensor_name(layer: int, which: str) -> str:
    return f"model.layers.{layer}.self_attn.attn_gate.{which}.weight"


def gate_tensors(gates, config: GateConfig) -> dict[str, np.ndarray]:
    """`{name: float32 array}` of a list of per-layer AttnGates."""
    out = {}
    for i, gate in enumerate(gates):
        if gate.mask_linear_q is not None:
            out[tensor_name(i, "mask_linear_q")] = np.asarray(gate.mask_linear_q[...], np.float32)
        out[tensor_name(i, "mask_linear_k")] = np.asarray(gate.mask_linear_k[...], np.float32)
    return out


def save_gates(out_dir: str, gates, config: GateConfig, extra: dict | None = None) -> None:
    """Writes `gates.safetensors` and `gate_config.json` (plus `extra` fields, e.g. provenance)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = gate_tensors(gates, config)
    tmp = os.path.join(out_dir, GATES_FILE + ".tmp")
    save_file(tensors, tmp, metadata={"format": "seerjax-gates", "gate_type": config.gate_type})
    os.replace(tmp, os.path.join(out_dir, GATES_FILE))
    meta = config.to_dict()
    if extra:
        meta["extra"] = extra
    tmp = os.path.join(out_dir, GATE_CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, GATE_CONFIG_FILE))


def read_gate_config(gates_dir: str) -> GateConfig:
    """The GateConfig of a gates directory: seerjax's gate_config.json or the seed's config.json fields."""
    if not os.path.exists(gates_dir):
        raise FileNotFoundError(f"gates directory {gates_dir!r} does not exist")
    path = os.path.join(gates_dir, GATE_CONFIG_FILE)
    if os.path.exists(path):
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise GateConfigError(f"{path} is not valid JSON: {e}") from e
        d.pop("extra", None)
        return GateConfig.from_dict(d)
    seed_path = os.path.join(gates_dir, "config.json")
    if os.path.exists(seed_path):
        with open(seed_path) as f:
            return seed_config_to_gate_config(json.load(f), source=seed_path)
    raise GateConfigError(
        f"gates directory {gates_dir!r} has neither {GATE_CONFIG_FILE} nor a config.json with seerattn_* fields"
    )


def seed_config_to_gate_config(d: dict, source: str = "config.json") -> GateConfig:
    """A GateConfig from a seed-style model config.json (`seerattn_gate_type`, ...)."""
    if "seerattn_gate_type" not in d:
        raise GateConfigError(f"{source} has no seerattn_gate_type field; it does not describe SeerAttention gates")
    q_pool, k_pool = parse_gate_type(d["seerattn_gate_type"])
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    return GateConfig(
        num_layers=d["num_hidden_layers"],
        num_q_heads=heads,
        num_kv_heads=d.get("num_key_value_heads", heads),
        head_dim=head_dim,
        block_size=d.get("seerattn_gate_block_size", 64),
        d_gate=d.get("seerattn_gate_hidden_size", 128),
        q_pooling=q_pool,
        k_pooling=k_pool,
        heads="query",
        force_double=bool(d.get("seerattn_gate_force_double", False)),
    )


def gate_config_to_seed_fields(config: GateConfig) -> dict:
    """The seed's `seerattn_*` config.json fields for query-head gates."""
    if config.heads != "query":
        raise GateConfigError("the seed's prefill gate format holds per-query-head gates only; these gates have heads='kv'")
    if config.q_sub_blocks != 1 or config.k_sub_blocks != 1:
        raise GateConfigError(
            "the seed's prefill gate format scores whole blocks; these gates score sub-blocks "
            f"(q_sub_blocks={config.q_sub_blocks}, k_sub_blocks={config.k_sub_blocks})"
        )
    return {
        "seerattn_gate_type": config.gate_type,
        "seerattn_gate_block_size": config.block_size,
        "seerattn_gate_hidden_size": config.d_gate,
        "seerattn_gate_force_double": config.force_double,
    }


def expected_shapes(config: GateConfig) -> dict[str, tuple[int, ...]]:
    c = config
    nqp, nkp = len(c.q_pooling), len(c.k_pooling)
    shapes = {}
    for i in range(c.num_layers):
        if c.has_q_linear:
            qh, qin = (c.num_kv_heads, c.group * nqp * c.head_dim) if c.heads == "kv" else (c.num_q_heads, nqp * c.head_dim)
            shapes[tensor_name(i, "mask_linear_q")] = (qh, qin, c.d_gate)
            kh = c.num_kv_heads
        else:
            kh = c.num_q_heads
        shapes[tensor_name(i, "mask_linear_k")] = (kh, nkp * c.head_dim, c.d_gate)
    return shapes


def load_gate_tensors(gates_dir: str, config: GateConfig) -> dict[str, np.ndarray]:
    """Reads and checks the gate tensors of a directory against `config` (names and shapes)."""
    candidates = [GATES_FILE, "model.safetensors"]
    path = next((os.path.join(gates_dir, n) for n in candidates if os.path.exists(os.path.join(gates_dir, n))), None)
    if path is None:
        raise FileNotFoundError(f"gates directory {gates_dir!r} has no {' or '.join(candidates)}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise GateConfigError(f"cannot read gate file {path}: {e}") from e
    tensors = {k: v for k, v in tensors.items() if _KEY.match(k)}
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise GateConfigError(
            f"gate file {path} does not match its gate config ({config.gate_type}, {config.num_layers} layers, "
            f"heads={config.heads}): missing tensors {missing[:4]}{'…' if len(missing) > 4 else ''}, "
            f"unexpected tensors {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise GateConfigError(f"gate tensor {name} in {path} has shape {tuple(tensors[name].shape)}, expected {shape}")
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def check_gates_fit_model(config: GateConfig, *, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Refuses gates made for another model shape, naming each field that differs."""
    wrong = [
        f"{name} (gates {getattr(config, name)}, model {value})"
        for name, value in (
            ("num_layers", num_layers),
            ("num_q_heads", num_q_heads),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        )
        if getattr(config, name) != value
    ]
    if wrong:
        raise GateConfigError(f"these gates were made for another model: {', '.join(wrong)}")


def export_seed_format(out_dir: str, gates, config: GateConfig, model_hf_config: dict) -> None:
    """Writes gates as the seed publishes them: `model.safetensors` + config.json with seerattn_* fields."""
    os.makedirs(out_dir, exist_ok=True)
    save_file(gate_tensors(gates, config), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model_hf_config)
    cfg.update(gate_config_to_seed_fields(config))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def gate_config_for_model(model_config, **settings) -> GateConfig:
    """A GateConfig shaped for a seerjax ModelConfig; `settings` are the gate options (block_size, ...)."""
    return GateConfig(
        num_layers=model_config.num_layers,
        num_q_heads=model_config.num_heads,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        **settings,
    )


def attach_gates(model, config: GateConfig, *, seed: int = 0, param_dtype=None) -> list:
    """Gives every attention layer of `model` a freshly initialized AttnGate; returns them."""
    import jax.numpy as jnp
    from flax import nnx

    from seerjax.gate import AttnGate

    mc = model.config
    check_gates_fit_model(
        config, num_layers=mc.num_layers, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim
    )
    rngs = nnx.Rngs(seed)
    gates = []
    for layer in model.layers:
        gate = AttnGate(config, rngs=rngs, param_dtype=param_dtype or jnp.float32)
        layer.attn.gate = gate
        gates.append(gate)
    return gates


def model_gates(model) -> list:
    """The AttnGates of a model, one per layer; a clear error when it has none."""
    gates = [layer.attn.gate for layer in model.layers]
    if any(g is None for g in gates):
        raise GateConfigError("the model has no AttnGates; load them with load_gates(model, gates_dir) or train them with distill")
    return gates


def load_gates(model, gates_dir: str, config: GateConfig | None = None):
    """Reads a gates directory (seerjax's or the seed's format), checks it fits `model`, attaches the gates.

    `config` attaches them with other sub-block settings (the scoring grain; the tensors are the same) than the
    directory's; every other setting must agree with the directory's.
    """
    import jax.numpy as jnp

    found = read_gate_config(gates_dir)
    if config is None:
        config = found
    elif not found.same_but_grain(config):
        raise GateConfigError(
            f"the gates in {gates_dir!r} were made with {found.to_dict()}, which differs from the requested "
            f"{config.to_dict()} in more than q_sub_blocks / k_sub_blocks"
        )
    mc = model.config
    check_gates_fit_model(
        config, num_layers=mc.num_layers, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim
    )
    tensors = load_gate_tensors(gates_dir, config)
    gates = attach_gates(model, config)
    for i, gate in enumerate(gates):
        if gate.mask_linear_q is not None:
            gate.mask_linear_q[...] = jnp.asarray(tensors[tensor_name(i, "mask_linear_q")])
        gate.mask_linear_k[...] = jnp.asarray(tensors[tensor_name(i, "mask_linear_k")])
    return config
