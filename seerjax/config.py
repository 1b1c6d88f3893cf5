"""Model configuration: a frozen, self-validating dataclass built from (and exported to) HF config.json.

Supported families: ``llama`` (Llama 2, 3, 3.1, 3.2), ``qwen2`` and ``qwen3``. config.json comes in two
forms and both are read:

- transformers 4: ``rope_theta`` at the top level and an optional ``rope_scaling`` dict whose type is under
  ``rope_type`` (or the legacy ``type``);
- transformers 5: a ``rope_parameters`` dict holding ``rope_type``, ``rope_theta`` and the scaling fields.

Keys seerjax does not interpret are kept in :attr:`ModelConfig.extra` (HF configs carry many harmless ones:
token ids, ``use_cache``, ``initializer_range``, and the SeerAttention gate's ``seerattn_*`` fields) and are
written back by :meth:`ModelConfig.to_hf_dict`. Only fields that change the computation are checked, and an
unsupported value of one of them raises :class:`~seerjax.errors.ConfigError` naming the field and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from seerjax.errors import ConfigError, MissingFileError

MODEL_TYPES = ("llama", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Defaults of the transformers config classes, for keys a config.json may leave out.
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
    "qwen3": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "head_dim": 128},
}
_DEFAULT_THETA = 10_000.0
# Keys the parser consumes (their information lives in typed fields) or that export rewrites.
_CONSUMED = frozenset(
    {
        "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act",
        "max_position_embeddings", "tie_word_embeddings", "attention_bias", "rope_theta", "rope_scaling",
        "rope_parameters", "layer_types", "transformers_version", "torch_dtype", "dtype",
    }
)


def _number(value, field: str, *, integer: bool = False, positive: bool = True, minimum=None) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and positive:
        ok = value > 0
    if ok and minimum is not None:
        ok = value >= minimum
    if not ok:
        kind = "integer" if integer else "number"
        bound = f" >= {minimum}" if minimum is not None else (" > 0" if positive else "")
        raise ConfigError(f"{field} must be a finite {kind}{bound}, got {value!r}")
    return int(value) if integer else float(value)


def _bool(value, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field} must be true or false, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, resolved (defaults filled in) as transformers 5 computes them.

    rope_type: "default", "linear", "llama3" or "yarn".
    theta: base wavelength (HF ``rope_theta``).
    factor: context extension factor (linear, llama3, yarn).
    low_freq_factor, high_freq_factor: llama3 band edges, as multiples of the original context's wavelength.
    original_max_position_embeddings: pretraining context (llama3, yarn).
    beta_fast, beta_slow, mscale, mscale_all_dim, attention_factor, truncate: yarn (see
      :func:`seerjax.rope.rope_frequencies`); None means "as transformers defaults it".
    """

    rope_type: str = "default"
    theta: float = _DEFAULT_THETA
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")
        _number(self.theta, "rope_theta")
        needs = {
            "default": (),
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings"),
        }[self.rope_type]
        for name in needs:
            if getattr(self, name) is None:
                raise ConfigError(f"rope_type {self.rope_type!r} needs rope parameter {name}, which is missing")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name)
        for name in ("beta_fast", "beta_slow", "attention_factor"):
            if getattr(self, name) is not None:
                _number(getattr(self, name), name, positive=False, minimum=0)
        if self.original_max_position_embeddings is not None:
            _number(self.original_max_position_embeddings, "original_max_position_embeddings", integer=True)
        _bool(self.truncate, "truncate")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError(
                f"llama3 rope needs high_freq_factor > low_freq_factor, got high_freq_factor={self.high_freq_factor} "
                f"and low_freq_factor={self.low_freq_factor}"
            )

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], max_position_embeddings: int) -> "RopeConfig":
        """Reads either config.json form (see the module docstring) as transformers 5 standardizes it."""
        params = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(params, Mapping):
            field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
            raise ConfigError(f"{field} must be a dict, got {params!r}")
        if isinstance(params.get("full_attention"), Mapping):  # nested by layer type; every layer is full
            params = params["full_attention"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", d.get("rope_theta", _DEFAULT_THETA))
        prf = params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if prf not in (None, 1, 1.0):
            raise ConfigError(f"partial_rotary_factor {prf!r} is not supported; expected 1.0 (rotary on the whole head)")
        kw: dict[str, Any] = {"rope_type": rope_type, "theta": theta}
        if rope_type in ("llama3", "yarn"):
            # transformers gives a top-level original_max_position_embeddings priority (Phi-3 style configs).
            omp = d.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
            kw["original_max_position_embeddings"] = max_position_embeddings if omp is None else omp
        if rope_type in ("linear", "llama3"):
            kw["factor"] = params.get("factor")
        if rope_type == "llama3":
            kw["low_freq_factor"] = params.get("low_freq_factor")
            kw["high_freq_factor"] = params.get("high_freq_factor")
        if rope_type == "yarn":
            factor = params.get("factor")
            omp = kw["original_max_position_embeddings"]
            if factor is None and isinstance(omp, (int, float)) and omp > 0:
                factor = max_position_embeddings / omp
            kw["factor"] = factor
            for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                kw[name] = params.get(name)
            truncate = params.get("truncate")
            kw["truncate"] = True if truncate is None else truncate
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The transformers-5 ``rope_parameters`` dict."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        names = {
            "default": (),
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": (
                "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                "attention_factor", "truncate",
            ),
        }[self.rope_type]
        for name in names:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only Llama/Qwen transformer. Validated on construction; hashable (jit-static).

    Shapes: vocab V = vocab_size, embed E = hidden_size, mlp F = intermediate_size, Hq = num_heads,
    Hkv = num_kv_heads, D = head_dim.

    attention_bias: q, k and v projections have biases (qwen2 always; llama and qwen3 when configured).
    attention_out_bias: the output projection has a bias (llama and qwen3 with attention_bias; never qwen2).
    qk_norm: RMSNorm over head_dim on q and k before RoPE (qwen3).
    attention: name of the default attention function in :data:`seerjax.attention.ATTENTION_FNS`
      (a runtime choice, not written to config.json).
    extra: config.json keys seerjax does not interpret, as sorted ``(key, json text)`` pairs so the config
      stays hashable; read them with :attr:`extra_dict`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention: str = "reference"
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            _number(getattr(self, name), name, integer=True)
        _number(self.rms_norm_eps, "rms_norm_eps")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; expected 'silu'")
        if not isinstance(self.rope, RopeConfig):
            raise ConfigError(f"rope must be a RopeConfig, got {type(self.rope).__name__}")
        for name in ("attention_bias", "attention_out_bias", "qk_norm", "tie_word_embeddings"):
            _bool(getattr(self, name), name)
        if not isinstance(self.attention, str) or not self.attention:
            raise ConfigError(f"attention must be the name of a registered attention function, got {self.attention!r}")
        if not isinstance(self.extra, tuple) or not all(
            isinstance(kv, tuple) and len(kv) == 2 and all(isinstance(x, str) for x in kv) for kv in self.extra
        ):
            raise ConfigError("extra must be a tuple of (key, json text) pairs; build configs with ModelConfig.from_hf_dict")

    # -- HF config.json ------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides) -> "ModelConfig":
        """Builds the config from a parsed HF config.json; ``overrides`` replace fields after parsing."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a HF config must be a dict (parsed config.json), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {model_type!r} is not supported; expected one of {MODEL_TYPES}")
        defaults = _DEFAULTS[model_type]

        def get(key, default=None, required=False):
            if key not in d or d[key] is None:
                if required:
                    raise ConfigError(f"config field {key} is required for model_type {model_type!r} but missing")
                return defaults.get(key, default)
            return d[key]

        hidden = get("hidden_size", required=True)
        heads = get("num_attention_heads", required=True)
        _number(hidden, "hidden_size", integer=True)
        _number(heads, "num_attention_heads", integer=True)
        head_dim = get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConfigError(
                    f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads}) when head_dim is not given"
                )
            head_dim = hidden // heads
        max_pos = get("max_position_embeddings")
        _number(max_pos, "max_position_embeddings", integer=True)

        if get("mlp_bias", False):
            raise ConfigError(f"mlp_bias {d['mlp_bias']!r} is not supported; expected false")
        if model_type == "qwen2":
            qkv_bias, out_bias = True, False
        else:
            qkv_bias = out_bias = _bool(get("attention_bias", False), "attention_bias")
        if model_type in ("qwen2", "qwen3"):
            _check_full_attention(d, get("num_hidden_layers", required=True))

        config = cls(
            model_type=model_type,
            vocab_size=get("vocab_size", required=True),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", required=True),
            num_layers=get("num_hidden_layers", required=True),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps"),
            rope=RopeConfig.from_hf(d, int(max_pos)),
            max_position_embeddings=max_pos,
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=_bool(get("tie_word_embeddings", False), "tie_word_embeddings"),
            hidden_act=get("hidden_act", "silu"),
            extra=tuple(sorted((k, json.dumps(v, default=str)) for k, v in d.items() if k not in _CONSUMED)),
        )
        return config.replace(**overrides) if overrides else config

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "ModelConfig":
        """Reads a config.json file (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise MissingFileError(f"config file {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_hf_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 config.json dict that ``AutoConfig``/``AutoModelForCausalLM`` load."""
        d: dict[str, Any] = dict(self.extra_dict)
        d.update(
            architectures=[_ARCHITECTURES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            rope_parameters=self.rope.to_hf(),
        )
        if self.model_type != "qwen2":
            d["attention_bias"] = self.attention_bias
        if self.model_type != "qwen2" or self.head_dim * self.num_heads != self.hidden_size:
            d["head_dim"] = self.head_dim  # Qwen2Config has no head_dim field; its models derive it
        return d

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def extra_dict(self) -> dict[str, Any]:
        """The uninterpreted config.json keys with their values."""
        return {k: json.loads(v) for k, v in self.extra}

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with fields replaced; unknown field names raise a ConfigError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; expected some of {sorted(names)}")
        return dataclasses.replace(self, **changes)


def _check_full_attention(d: Mapping[str, Any], num_layers) -> None:
    """Qwen2/Qwen3 may switch some layers to sliding-window attention; seerjax implements full attention only."""
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        max_window_layers = d.get("max_window_layers", 28)
        sliding = window is not None and isinstance(num_layers, int) and max_window_layers < num_layers
    else:
        if not isinstance(layer_types, (list, tuple)):
            raise ConfigError(f"layer_types must be a list, got {layer_types!r}")
        bad = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ConfigError(f"layer_types {bad} are not supported; expected 'full_attention'")
        sliding = window is not None and "sliding_attention" in layer_types
    if sliding:
        raise ConfigError(
            f"use_sliding_window true with sliding_window {window!r} is not supported; seerjax implements full "
            "attention only (set use_sliding_window to false)"
        )
