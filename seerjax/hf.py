"""HF checkpoints ↔ seerjax models: ``from_pretrained`` and ``save_pretrained``.

The key map is data (:data:`HF_KEY_MAP`): HF tensor name template → parameter path → layout. Loading builds
the model abstractly (``nnx.eval_shape``, no weights allocated), then reads the safetensors files shard by
shard and tensor by tensor, checks each tensor's shape against what the parameter needs *before* converting
its layout, casts it to the target dtype (a bfloat16 tensor loaded as bfloat16 is never widened) and puts it on
the device, so host memory holds the device copy plus one tensor in flight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # also registers bfloat16 with numpy, which safetensors' numpy reader needs
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from seerjax.config import ModelConfig
from seerjax.dtypes import numpy_dtype, resolve_dtype
from seerjax.errors import CheckpointError, MissingFileError
from seerjax.model import LlamaModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an HF tensor relates to its parameter.

    kind "copy": same shape. "flat": HF stores the parameter flattened (q/k/v biases ``[H*D]`` → ``[H, D]``).
    "linear": HF ``nn.Linear`` weight ``[out, in]``; the parameter's first ``n_in`` axes are the input, the rest
    the output, so ``param = hf.T.reshape(param_shape)``.
    """

    kind: str
    n_in: int = 0

    def hf_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kind == "copy":
            return tuple(param_shape)
        if self.kind == "flat":
            return (math.prod(param_shape),)
        return (math.prod(param_shape[self.n_in :]), math.prod(param_shape[: self.n_in]))

    def to_param(self, hf: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
        return hf.T.reshape(param_shape) if self.kind == "linear" else hf.reshape(param_shape)

    def to_hf(self, param: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            shape = param.shape
            param = param.reshape(math.prod(shape[: self.n_in]), math.prod(shape[self.n_in :])).T
        return np.ascontiguousarray(param.reshape(self.hf_shape(param.shape)) if self.kind == "flat" else param)


COPY, FLAT = Layout("copy"), Layout("flat")
_LAYER = "model.layers.{i}."
# HF name template ({i}: layer index) → (parameter path, layout). Absent optional parameters (biases, q/k
# norms, an untied LM head) are simply not in the model, so their HF names count as unexpected.
HF_KEY_MAP: dict[str, tuple[tuple, Layout]] = {
    "model.embed_tokens.weight": (("embed",), COPY),
    "lm_head.weight": (("lm_head",), COPY),
    "model.norm.weight": (("final_norm", "weight"), COPY),
    _LAYER + "input_layernorm.weight": (("layers", "{i}", "attn_norm", "weight"), COPY),
    _LAYER + "post_attention_layernorm.weight": (("layers", "{i}", "mlp_norm", "weight"), COPY),
    _LAYER + "self_attn.q_proj.weight": (("layers", "{i}", "attn", "q_proj"), Layout("linear", 1)),
    _LAYER + "self_attn.k_proj.weight": (("layers", "{i}", "attn", "k_proj"), Layout("linear", 1)),
    _LAYER + "self_attn.v_proj.weight": (("layers", "{i}", "attn", "v_proj"), Layout("linear", 1)),
    _LAYER + "self_attn.o_proj.weight": (("layers", "{i}", "attn", "o_proj"), Layout("linear", 2)),
    _LAYER + "self_attn.q_proj.bias": (("layers", "{i}", "attn", "q_bias"), FLAT),
    _LAYER + "self_attn.k_proj.bias": (("layers", "{i}", "attn", "k_bias"), FLAT),
    _LAYER + "self_attn.v_proj.bias": (("layers", "{i}", "attn", "v_bias"), FLAT),
    _LAYER + "self_attn.o_proj.bias": (("layers", "{i}", "attn", "o_bias"), COPY),
    _LAYER + "self_attn.q_norm.weight": (("layers", "{i}", "attn", "q_norm", "weight"), COPY),
    _LAYER + "self_attn.k_norm.weight": (("layers", "{i}", "attn", "k_norm", "weight"), COPY),
    _LAYER + "mlp.gate_proj.weight": (("layers", "{i}", "mlp", "gate_proj"), Layout("linear", 1)),
    _LAYER + "mlp.up_proj.weight": (("layers", "{i}", "mlp", "up_proj"), Layout("linear", 1)),
    _LAYER + "mlp.down_proj.weight": (("layers", "{i}", "mlp", "down_proj"), Layout("linear", 1)),
}
# Non-parameter buffers some older checkpoints saved; transformers ignores them too.
IGNORED_KEYS = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
    # SeerAttention gates saved inside a model checkpoint load separately (seerjax.gates_io.load_gates).
    re.compile(r"model\.layers\.\d+\.self_attn\.attn_gate\..*"),
)
_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def _compile(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + r"\Z")


_PATTERNS = [(_compile(t), path, layout) for t, (path, layout) in HF_KEY_MAP.items()]


def hf_key_to_param(key: str) -> tuple[tuple, Layout] | None:
    """``"model.layers.3.mlp.up_proj.weight"`` → ``(("layers", 3, "mlp", "up_proj"), layout)``; None if unmapped."""
    for pattern, path, layout in _PATTERNS:
        m = pattern.match(key)
        if m:
            return tuple(int(m.group(1)) if p == "{i}" else p for p in path), layout
    return None


def param_to_hf_key(path: tuple) -> tuple[str, Layout]:
    """The inverse of :func:`hf_key_to_param`."""
    for template, (tpl_path, layout) in HF_KEY_MAP.items():
        pairs = list(zip(tpl_path, path))
        if len(tpl_path) == len(path) and all(t == p or (t == "{i}" and isinstance(p, int)) for t, p in pairs):
            layer = next((p for t, p in pairs if t == "{i}"), None)
            return template.format(i=layer), layout
    raise CheckpointError(f"parameter {'.'.join(map(str, path))} has no HF name in HF_KEY_MAP")


# -- loading ---------------------------------------------------------------------------------------


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.bfloat16, **overrides) -> LlamaModel:
    """Loads a local HF checkpoint directory into a :class:`~seerjax.model.LlamaModel`.

    Args:
      path: directory with config.json and model.safetensors, or a sharded checkpoint
        (model.safetensors.index.json and the shards it names).
      dtype: parameter and compute dtype: a jnp dtype or "bfloat16", "float32", "float16".
      overrides: :class:`~seerjax.config.ModelConfig` fields to replace after reading config.json, e.g.
        ``attention="cudnn"`` or ``max_position_embeddings=131072``.

    Raises:
      FileNotFoundError (:class:`~seerjax.errors.MissingFileError`, also a ValueError): the directory,
        config.json, the weights or a shard does not exist.
      ValueError (:class:`~seerjax.errors.CheckpointError` or ``ConfigError``): an unsupported config, a
        missing, unexpected or mis-shaped tensor, or an unreadable safetensors file; the message names it.
    """
    dtype = resolve_dtype(dtype, "dtype")
    directory = os.fspath(path)
    if not os.path.exists(directory):
        raise MissingFileError(f"checkpoint path {directory} does not exist")
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint path {directory} must be a directory holding config.json and safetensors")
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"checkpoint directory {directory} has no {CONFIG_FILE}")
    config = ModelConfig.from_json(config_path, **overrides)
    files = _weight_files(directory)

    abstract = nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat_state = nnx.to_flat_state(state)
    params = {p: v for p, v in flat_state if isinstance(v, nnx.Param)}
    loaded: dict[tuple, str] = {}
    target = numpy_dtype(dtype)
    for file in files:
        for key, read in _tensors(file):
            mapped = hf_key_to_param(key)
            if mapped is None or mapped[0] not in params:
                if any(p.match(key) for p in IGNORED_KEYS) or (key == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                raise CheckpointError(
                    f"unexpected tensor {key} in {file}: the {config.model_type} model "
                    f"({config.num_layers} layers) has no parameter for it"
                )
            param_path, layout = mapped
            if param_path in loaded:
                raise CheckpointError(f"tensor {key} appears twice: in {loaded[param_path]} and in {file}")
            var = params[param_path]
            array = read()
            expected = layout.hf_shape(var.shape)
            if tuple(array.shape) != expected:
                raise CheckpointError(
                    f"tensor {key} in {file} has shape {tuple(array.shape)}, expected {expected} for this config"
                )
            value = layout.to_param(array.astype(target, copy=False), var.shape)
            var.set_value(jax.device_put(value))
            loaded[param_path] = os.path.basename(file)
            del array, value
    missing = [param_to_hf_key(p)[0] for p in params if p not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"checkpoint {directory} is missing tensors: {shown}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat_state))


def _weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint, as transformers picks them (single file first, then the index)."""
    single = os.path.join(directory, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(index_path):
        others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".safetensors")))
        hint = f" (found {others}; only {WEIGHTS_FILE} or {INDEX_FILE} with its shards is read)" if others else ""
        raise MissingFileError(f"checkpoint directory {directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index (needs a 'weight_map' dict): {e!r}") from None
    files = []
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"{index_path} names shard {shard!r}; expected a file name in {directory}")
        file = os.path.join(directory, shard)
        if not os.path.isfile(file):
            raise MissingFileError(f"shard {shard} named in {index_path} does not exist")
        files.append(file)
    return files


@contextlib.contextmanager
def _safetensors_errors(file: str, what: str):
    """Re-raises safetensors' (Rust, OS or numpy) errors with the file name and what was being read."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises SafetensorError, OSError, TypeError, ... from Rust
        raise CheckpointError(
            f"cannot read {what} of safetensors file {file}; is it truncated or corrupt? ({type(e).__name__}: {e})"
        ) from e


def _open(file: str):
    try:
        # pread: tensors are read into fresh buffers instead of touching a whole-file memory map, whose pages
        # would count as resident memory on top of the loaded weights (safetensors >= 0.8 has it).
        return safe_open(file, framework="numpy", backend="pread")
    except TypeError:
        return safe_open(file, framework="numpy")


def _tensors(file: str) -> Iterator[tuple[str, Any]]:
    """``(key, read)`` for each tensor of one file; ``read()`` returns it as a numpy array."""
    with contextlib.ExitStack() as stack:
        with _safetensors_errors(file, "the header"):
            f = stack.enter_context(_open(file))
            keys = list(f.keys())
        for key in keys:
            with _safetensors_errors(file, f"tensor {key}"):
                dtype = f.get_slice(key).get_dtype()
            if dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"tensor {key} in {file} has dtype {dtype}; expected one of {sorted(_FLOAT_DTYPES)}")

            def read(key=key):
                with _safetensors_errors(file, f"tensor {key}"):
                    return f.get_tensor(key)

            yield key, read


# -- saving ----------------------------------------------------------------------------------------


def _parse_size(size) -> int:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0:
        return int(size)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size) if isinstance(size, str) else None
    if not m:
        raise CheckpointError(f"max_shard_size must be a positive byte count or a string like '5GB', got {size!r}")
    unit = m.group(2)
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30} if "i" in unit else {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(m.group(1)) * scale[unit[0]])


def save_pretrained(model: LlamaModel, path: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """Writes ``model`` as an HF checkpoint (config.json + safetensors) that transformers loads.

    Tensors are written in the parameters' dtype. Checkpoints larger than ``max_shard_size`` are split into
    ``model-0000i-of-0000n.safetensors`` shards with a ``model.safetensors.index.json``; host memory holds one
    shard at a time. Attached AttnGates are not part of the base checkpoint (``seerjax.gates_io.save_gates``).
    """
    if not isinstance(model, LlamaModel):
        raise CheckpointError(f"model must be a seerjax LlamaModel, got {type(model).__name__}")
    limit = _parse_size(max_shard_size)
    directory = os.fspath(path)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"save path {directory} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)

    entries = []  # (hf key, layout, variable)
    for param_path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if "gate" in param_path[:4]:  # ("layers", i, "attn", "gate", ...): AttnGates are saved on their own
            continue
        key, layout = param_to_hf_key(tuple(param_path))
        entries.append((key, layout, var))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2].shape) * jnp.dtype(entry[2].dtype).itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    n = len(shards)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, shard in zip(names, shards):
        tensors = {key: layout.to_hf(np.asarray(jax.device_get(var[...]))) for key, layout, var in shard}
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del tensors
    stale = INDEX_FILE if n == 1 else WEIGHTS_FILE  # a leftover of the other layout would contradict this one
    if os.path.isfile(os.path.join(directory, stale)):
        os.remove(os.path.join(directory, stale))
    if len(shards) > 1:
        total = sum(math.prod(v.shape) * jnp.dtype(v.dtype).itemsize for _, _, v in entries)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)

    hf_config = model.config.to_hf_dict()
    hf_config["dtype"] = jnp.dtype(model.param_dtype).name
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


# config.json keys seerjax adds beside the model's own (the byte-level tokenizer marker), kept by every export.
SEERJAX_CONFIG_KEYS = ("seerjax_tokenizer", "eos_token_id")
# Files beside the weights that an export carries over from its source model directory.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


def copy_model_extras(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """After `save_pretrained(..., dst_dir)`: copies the source model's tokenizer files (those present) and
    :data:`SEERJAX_CONFIG_KEYS` of its config.json, so the export loads with the same tokenizer."""
    import shutil

    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
    with open(os.path.join(src_dir, CONFIG_FILE)) as f:
        src_config = json.load(f)
    extra = {k: src_config[k] for k in SEERJAX_CONFIG_KEYS if k in src_config}
    if not extra:
        return
    path = os.path.join(dst_dir, CONFIG_FILE)
    with open(path) as f:
        dst_config = json.load(f)
    dst_config.update(extra)
    with open(path, "w") as f:
        json.dump(dst_config, f, indent=2, sort_keys=True)
