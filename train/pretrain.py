"""Pretraining a small Llama-architecture base model from scratch, with the project's own model code.

Byte-level (257 ids: bytes and EOS), trained on the embedded corpus mixed with synthetic retrieval documents,
jitted, bf16 compute with float32 parameters and optimizer state, orbax checkpoints (resumable), and an
HF-format export (`OUT/model`: config.json + model.safetensors) that every other command loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seerjax.config import ModelConfig, RopeConfig
from seerjax.train.corpus import SYNTHETIC_MIN_FRACTION

PRESETS = {
    # CPU: a few minutes on 2 cores.
    "mini": dict(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32),
    # GPU study: minutes on one H100 at 8k context.
    "small": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2, head_dim=64),
    # CI tests.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
}


class PretrainError(ValueError):
    """Bad pretraining settings."""


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    out: str
    preset: str = "mini"
    data: str = "embedded"
    seq_len: int = 1024
    steps: int = 300
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 30
    save_every: int = 100
    seed: int = 0
    dtype: str = "bfloat16"
    retrieval_docs: int = 2000
    retrieval_min_fraction: float = SYNTHETIC_MIN_FRACTION  # synthetic documents: this fraction of seq_len to all of it
    passkey_min_fraction: float | None = None  # the passkey documents' own (default: retrieval_min_fraction)
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # "TYPE:FACTOR[:ORIGINAL]" (see `rope_config`), e.g. a longer stage's llama3:2
    attention: str | None = None
    progress: bool = True
    init_model: str | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise PretrainError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("seq_len", "steps", "batch", "save_every"):
            if getattr(self, name) < 1:
                raise PretrainError(f"{name} must be positive, got {getattr(self, name)}")
        if not (isinstance(self.rope_theta, (int, float)) and np.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise PretrainError(f"rope_theta must be a finite number > 1, got {self.rope_theta!r}")
        for name in ("retrieval_min_fraction", "passkey_min_fraction"):
            f = getattr(self, name)
            if f is None and name == "passkey_min_fraction":
                continue
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise PretrainError(f"{name} must be a number in (0, 1], got {f!r}")
        if self.seq_len < 16:
            raise PretrainError(f"seq_len must be at least 16, got {self.seq_len}")
        rope_config(self.rope_theta, self.rope_scaling, self.seq_len)  # refuses a bad spec before any loading


ROPE_SCALINGS = ("linear", "llama3", "yarn")


def rope_config(theta: float, scaling: str | None, seq_len: int) -> RopeConfig:
    """The RoPE of a pretraining run: base wavelength `theta`, and optionally a context-extension scaling.

    `scaling` is "TYPE:FACTOR[:ORIGINAL]": TYPE linear, llama3 or yarn (`seerjax.rope`), FACTOR > 1 the length
    ratio, ORIGINAL the context the starting model was trained at (default seq_len // FACTOR). llama3 takes
    Llama 3.1's band edges (low_freq_factor 1, high_freq_factor 4): wavelengths longer than ORIGINAL are
    stretched by FACTOR, those shorter than ORIGINAL / 4 are kept, so a stage at FACTOR times the length sees
    its long distances at the angles the shorter stage trained, and its short ones unchanged.
    """
    if scaling is None:
        return RopeConfig(theta=theta)
    parts = scaling.split(":") if isinstance(scaling, str) else []
    if len(parts) not in (2, 3) or parts[0] not in ROPE_SCALINGS:
        raise PretrainError(f"rope_scaling must be TYPE:FACTOR[:ORIGINAL] with TYPE one of {ROPE_SCALINGS} "
                            f"(e.g. llama3:2), got {scaling!r}")
    try:
        factor = float(parts[1])
        original = int(parts[2]) if len(parts) == 3 else int(seq_len // factor) if factor > 0 else 0
    except (ValueError, OverflowError):
        raise PretrainError(f"rope_scaling {scaling!r}: FACTOR must be a number and ORIGINAL an integer") from None
    if not (np.isfinite(factor) and factor > 1):
        raise PretrainError(f"rope_scaling {scaling!r}: FACTOR must be a finite number > 1, got {parts[1]!r}")
    if not 16 <= original < seq_len:
        raise PretrainError(f"rope_scaling {scaling!r}: ORIGINAL must be an integer from 16 to below seq_len={seq_len} "
                            f"(the shorter context the starting model was trained at), got {original}")
    kind = parts[0]
    kw = dict(rope_type=kind, theta=theta, factor=factor)
    if kind == "llama3":
        kw.update(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=original)
    elif kind == "yarn":
        kw.update(original_max_position_embeddings=original)
    return RopeConfig(**kw)


def model_config(s: PretrainSettings) -> ModelConfig:
    from seerjax.train.data import ByteTokenizer

    return ModelConfig(
        model_type="llama",
        vocab_size=ByteTokenizer.vocab_size,
        max_position_embeddings=max(s.seq_len, 2048),
        rms_norm_eps=1e-5,
        rope=rope_config(s.rope_theta, s.rope_scaling, s.seq_len),
        tie_word_embeddings=False,
        **PRESETS[s.preset],
    )


def training_documents(s: PretrainSettings) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(corpus train split, synthetic retrieval documents kept whole), tokenized as byte arrays."""
    from seerjax.train.data import ByteTokenizer, load_texts, split_whole, synthetic_token_documents, tokenize_documents

    texts = load_texts(s.data)
    tokenizer = ByteTokenizer()
    docs = tokenize_documents(texts, tokenizer)
    if not s.retrieval_docs:
        return docs, []
    # Sequences hold seq_len + 1 tokens (inputs and targets): a document of up to seq_len bytes fits whole.
    synthetic = synthetic_token_documents(texts, tokenizer, s.retrieval_docs, s.seq_len, seed=s.seed,
                                          min_fraction=s.retrieval_min_fraction,
                                          passkey_min_fraction=s.passkey_min_fraction)
    return split_whole(docs, synthetic, s.seq_len + 1)


def lm_loss(model, tokens_bt, attention):
    logits = model(tokens_bt[:, :-1], attention=attention)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_bt[:, 1:, None], axis=-1))


def default_attention(dtype) -> str:
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "reference"


def pretrain(s: PretrainSettings, *, docs=None, whole=None) -> dict:
    """Trains (or resumes) the base model; exports it to `OUT/model`. Returns a summary dict. With `init_model`
    the parameters start from that model (same architecture; any length) instead of a random draw; a
    checkpoint in `OUT` still takes precedence (resume).

    `docs` (stream documents) and `whole` (documents each kept whole in one sequence) replace the
    training documents of `s` when given."""
    import orbax.checkpoint as ocp

    from seerjax.hf import save_pretrained
    from seerjax.train.checkpoints import METRICS_FILE, checkpoint_manager, rewrite_metrics
    from seerjax.model import LlamaModel
    from seerjax.train.data import ByteTokenizer, PackedSequences
    from seerjax.train.steps import LaggedSteps

    cfg = model_config(s)
    attention = s.attention or default_attention(s.dtype)
    model = LlamaModel(cfg, dtype=s.dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(s.seed))
    os.makedirs(s.out, exist_ok=True)
    manager = checkpoint_manager(s.out)
    if s.init_model and manager.latest_step() is None:  # (a resume restores its checkpoint instead)
        # continue from a model of the same architecture (e.g. one pretrained at a shorter length)
        start_model = _init_model(s.init_model, cfg)
        if start_model.config.rope != cfg.rope:  # allowed (a context extension), but never silent
            print(f"--init-model {s.init_model}: its RoPE {start_model.config.rope} becomes {cfg.rope} in this run",
                  flush=True)
        nnx.update(model, nnx.state(start_model, nnx.Param))
    if docs is None:
        docs, whole = training_documents(s)
    data = PackedSequences(docs, s.seq_len + 1, ByteTokenizer.eos_token_id, seed=s.seed, whole=list(whole or []))
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(s.warmup, s.steps - 1), s.steps, end_value=s.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        def loss_fn(p):
            return lm_loss(nnx.merge(graphdef, p), tokens, attention)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = 0
    if manager.latest_step() is not None:
        restored = manager.restore(
            manager.latest_step(),
            args=ocp.args.Composite(params=ocp.args.StandardRestore(params), opt_state=ocp.args.StandardRestore(opt_state)),
        )
        params, opt_state, start = restored["params"], restored["opt_state"], manager.latest_step()
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    losses = []
    t_start = time.perf_counter()
    metrics_path = os.path.join(s.out, METRICS_FILE)
    rewrite_metrics(metrics_path, start)
    with open(metrics_path, "a") as metrics:

        def on_step(done, loss, dt):
            losses.append(loss)
            metrics.write(json.dumps({"step": done, "loss": loss, "tokens_per_s": s.batch * s.seq_len / dt}) + "\n")
            metrics.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", bits_per_byte=f"{loss / np.log(2):.3f}")
                bar.update(1)

        lagged = LaggedSteps(on_step)  # step k's loss is read after step k + 1 is dispatched
        for i in range(start, s.steps):
            tokens = jnp.asarray(data.batch(i * s.batch, s.batch))
            params, opt_state, loss = step(params, opt_state, tokens)
            lagged.push(i + 1, loss)
            if (i + 1) % s.save_every == 0 or i + 1 == s.steps:
                lagged.flush()  # logged before it is saved
                manager.save(
                    i + 1,
                    args=ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state)),
                    force=True,
                )
        lagged.flush()
    if bar is not None:
        bar.close()
    manager.close()
    nnx.update(model, params)
    export = os.path.join(s.out, "model")
    save_pretrained(model, export)
    _mark_byte_level(export)
    return {"model": export, "steps": s.steps, "final_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - t_start, "params": sum(x.size for x in jax.tree.leaves(params))}


# The fields a starting model (--init-model) must share with the preset; the length and the RoPE may differ
# (a longer stage may extend the context by a RoPE scaling or a larger theta).
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "attention_bias", "attention_out_bias", "qk_norm",
                "tie_word_embeddings", "hidden_act")


def _init_model(path: str, cfg: ModelConfig):
    """The model at `path` (HF format) in float32, refused by name unless its architecture is `cfg`'s."""
    from seerjax.errors import MissingFileError
    from seerjax.hf import CONFIG_FILE, from_pretrained

    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise MissingFileError(f"--init-model {path}: no {CONFIG_FILE} there (expected a model directory, e.g. "
                               f"OUT/model of an earlier pretrain)")
    other = ModelConfig.from_json(config_path)
    diff = [f"{f}: {getattr(other, f)!r} there, {getattr(cfg, f)!r} here" for f in _ARCH_FIELDS
            if getattr(other, f) != getattr(cfg, f)]
    if diff:
        raise PretrainError(f"--init-model {path} does not match this preset's architecture: " + "; ".join(diff))
    return from_pretrained(path, dtype="float32", max_position_embeddings=cfg.max_position_embeddings)


def _mark_byte_level(model_dir: str) -> None:
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["seerjax_tokenizer"] = "bytes"
    cfg["eos_token_id"] = 256
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
