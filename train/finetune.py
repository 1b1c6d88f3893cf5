"""Long-context fine-tuning: YaRN, block-sparse attention in the backward pass, sharded over a device mesh.

Every parameter trains. One step runs the model with the ``seer_train`` attention: each layer's AttnGate scores
the blocks (on stop-gradient q and k, before RoPE), TopK picks them, and `block_sparse_attention` — whose custom
VJP makes the backward pass sparse too — computes the attention the LM loss differentiates. On the side, the
true block max-pooled attention map comes from `attention_with_pooling` on stop-gradient q, k, v (no gradient
flows through it), and the seed's distillation loss keeps the gates matched to the changing model:

    loss = LM cross-entropy + gate_loss_scale · Σ_layers KL(pooled target ‖ softmax(gate))

The gates see stop-gradient inputs and the TopK mask is discrete, so the gate loss trains only the gates and the
LM loss only the model; each group has its own AdamW (the model's with ``lr`` and gradient clipping, the gates'
with ``gate_lr``), both with linear warm-up and cosine decay. ``attention="dense"`` is the baseline: dense
attention (reference, or cuDNN on GPU in 16-bit) for the LM loss, the gates still trained by the pooled loss so
they stay usable with the fine-tuned model.

Parameters and optimizer state are float32; the forward computes in ``dtype`` (bfloat16 by default). Each
decoder layer can be rematerialized in the backward pass (``remat``: a ``jax.checkpoint`` policy), and the LM
loss is computed over chunks of the sequence so the ``[B, T, vocab]`` logits never exist at once.

Sharding (see :mod:`seerjax.sharding`): parameters, optimizer state and batches are placed on a
``(data, fsdp, tensor)`` mesh from the parameters' logical axes; the jitted step declares its in/out
shardings and donates parameters and optimizer state; attention runs per device under ``shard_map``.

Checkpoints (orbax, sharded) hold parameters, gates, optimizer state, step and data position. Re-running the
same command after a crash (even kill -9) resumes and ends with the same weights as an uninterrupted run; a
checkpoint restores onto another mesh shape too. At the end OUT holds the fine-tuned model in Hugging Face
format (with its YaRN rope config) and its gates (gates.safetensors + gate_config.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from seerjax import sharding as shd
from seerjax.attention import AttentionError, AttentionInputs, AttentionOutputs, get_attention, register_attention
from seerjax.config import ModelConfig, RopeConfig
from seerjax.dtypes import resolve_dtype
from seerjax.gate import GateConfig, GateParam
from seerjax.model import LlamaModel, lm_logits
from seerjax.train.checkpoints import METRICS_FILE, checkpoint_manager, rewrite_metrics
from seerjax.train.distill import distill_loss

# Remat policy names → jax.checkpoint policies ("none": no rematerialization; "full": save only layer inputs).
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}
ATTENTION_MODES = {"seer": "seer_train", "dense": "dense_train"}
ROPE_SCALINGS = ("none", "yarn")


class FinetuneError(ValueError):
    """Bad fine-tuning settings."""


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run needs; the CLI flags map one to one onto these fields.

    batch is the global batch (sequences per micro-batch over all devices), split over the mesh's data × fsdp.
    """

    model: str
    gates: str
    data: str
    seq_len: int
    steps: int
    out: str
    batch: int = 1
    grad_accum: int = 1
    lr: float = 2e-5
    gate_lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    clip: float = 1.0
    save_every: int = 50
    seed: int = 0
    density: float = 0.1
    attention: str = "seer"
    dtype: str = "bfloat16"
    implementation: str | None = None
    remat: str = "full"
    rope_scaling: str = "none"
    rope_factor: float | None = None
    mesh: str | None = None
    gate_loss_scale: float = 10.0
    skip_fraction: float = 0.25
    loss_chunk: int = 2048
    export_dtype: str | None = None
    progress: bool = True

    def __post_init__(self):
        for name in ("seq_len", "steps", "batch", "grad_accum", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise FinetuneError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise FinetuneError(f"seq_len must be at least 2 (the LM loss predicts the next token), got {self.seq_len}")
        if self.warmup < 0:
            raise FinetuneError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("lr", "gate_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise FinetuneError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("weight_decay", "clip", "gate_loss_scale"):
            if not getattr(self, name) >= 0:
                raise FinetuneError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 < self.density <= 1.0:
            raise FinetuneError(f"density must be in (0, 1], got {self.density!r}")
        if self.attention not in ATTENTION_MODES:
            raise FinetuneError(f"attention must be one of {sorted(ATTENTION_MODES)}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise FinetuneError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise FinetuneError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if self.rope_scaling == "yarn":
            if self.rope_factor is None or not self.rope_factor >= 1.0:
                raise FinetuneError(f"rope_scaling 'yarn' needs rope_factor >= 1 (the context extension), got {self.rope_factor!r}")
        elif self.rope_factor is not None:
            raise FinetuneError(f"rope_factor={self.rope_factor} needs rope_scaling 'yarn'")
        if not 0.0 <= self.skip_fraction < 1.0:
            raise FinetuneError(f"skip_fraction must be in [0, 1), got {self.skip_fraction}")
        if self.loss_chunk < 0:
            raise FinetuneError(f"loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        resolve_dtype(self.dtype, "dtype")
        if self.export_dtype is not None:
            resolve_dtype(self.export_dtype, "export_dtype")
        if self.mesh is not None:
            shd.parse_mesh_spec(self.mesh, num_devices=1 << 30)  # syntax only; device counts are checked later


# -- model configuration ---------------------------------------------------------------------------------


def yarn_config(config: ModelConfig, factor: float) -> ModelConfig:
    """The config with YaRN rope scaling by ``factor`` over the model's pretraining context.

    original_max_position_embeddings is the model's current max_position_embeddings, which grows by the factor.
    YaRN replaces any rope scaling the model had (the rope theta is kept).
    """
    old = config.max_position_embeddings
    rope = RopeConfig(rope_type="yarn", theta=config.rope.theta, factor=float(factor), original_max_position_embeddings=old)
    return config.replace(rope=rope, max_position_embeddings=int(round(old * factor)))


def target_config(config: ModelConfig, s: FinetuneSettings) -> ModelConfig:
    return yarn_config(config, s.rope_factor) if s.rope_scaling == "yarn" else config


def abstract_model(config: ModelConfig, gate_config: GateConfig | None, dtype, param_dtype=jnp.float32) -> LlamaModel:
    """The model (compute in ``dtype``, parameters float32 by default) with its gates, as shapes only."""
    from seerjax.gates_io import attach_gates

    def build():
        model = LlamaModel(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        if gate_config is not None:
            attach_gates(model, gate_config)
        return model

    return nnx.eval_shape(build)


def prepare_model(model: LlamaModel, config: ModelConfig, dtype) -> LlamaModel:
    """A model with ``config`` (e.g. YaRN), float32 parameters and compute dtype ``dtype``, weights of ``model``.

    Gates are not carried over (load them afterwards); the config's rope is static, so the model is rebuilt.
    """
    _, _, params, _ = nnx.split(model, GateParam, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    graphdef, _ = nnx.split(abstract_model(config, None, dtype))
    return nnx.merge(graphdef, params)


# -- attention for training ------------------------------------------------------------------------------


def _train_attention(inputs: AttentionInputs, *, sparse: bool) -> AttentionOutputs:
    from seerjax.kernels import attention_with_pooling, block_sparse_attention
    from seerjax.selection import SelectionConfig, achieved_density, select_blocks
    from seerjax.sparse_attention import gate_logits

    gate = inputs.gate
    if gate is None:
        raise AttentionError(
            f"fine-tuning attention needs AttnGates, but layer {inputs.layer} has none; load them with "
            "seerjax.gates_io.load_gates(model, gates_dir)"
        )
    cfg = inputs.config
    bs = gate.config.block_size
    logits = gate_logits(inputs)
    aux = {"gate_logits": logits}
    if cfg.get("gate_loss", True):
        sg = jax.lax.stop_gradient
        _, pooled = attention_with_pooling(
            sg(inputs.q), sg(inputs.k), sg(inputs.v), causal=inputs.causal, block_size=bs,
            sm_scale=cfg.get("sm_scale"), lengths=inputs.lengths, implementation=cfg.get("implementation"),
        )
        aux["pooled"] = sg(pooled)
    if not sparse:
        dense = get_attention(cfg.get("dense", "reference"))
        return AttentionOutputs(dense(inputs).out, aux)
    valid = None
    if inputs.lengths is not None:
        nk = -(-inputs.k.shape[1] // bs)
        valid = jnp.arange(nk)[None, :] * bs < inputs.lengths.astype(jnp.int32)[:, None]
    selection = SelectionConfig.from_options(cfg)
    scores = jax.nn.softmax(jax.lax.stop_gradient(logits), axis=-1)
    mask = select_blocks(scores, selection, causal=inputs.causal, key_blocks_valid=valid)
    out = block_sparse_attention(
        inputs.q, inputs.k, inputs.v, mask, causal=inputs.causal, block_size=bs, sm_scale=cfg.get("sm_scale"),
        lengths=inputs.lengths, implementation=cfg.get("implementation"),
    )
    aux["density"] = achieved_density(mask, causal=inputs.causal, key_blocks_valid=valid)
    return AttentionOutputs(out, aux)


@register_attention("seer_train")
def seer_train_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """Gate → TopK → differentiable `block_sparse_attention`; aux: gate logits, pooled target, density.

    Config: ``density`` (or ``threshold``), ``implementation``, ``gate_loss`` (False skips the pooled target).
    """
    return _train_attention(inputs, sparse=True)


@register_attention("dense_train")
def dense_train_attention(inputs: AttentionInputs) -> AttentionOutputs:
    """Dense attention (``config["dense"]``: "reference" or "cudnn") plus the gate logits and pooled target."""
    return _train_attention(inputs, sparse=False)


def dense_attention_name(s: FinetuneSettings) -> str:
    """cuDNN flash attention on GPU in 16-bit, the jnp reference otherwise."""
    if s.implementation == "reference" or jax.default_backend() not in ("gpu", "cuda"):
        return "reference"
    return "cudnn" if resolve_dtype(s.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) else "reference"


# -- forward and loss ------------------------------------------------------------------------------------


def forward_hidden(model: LlamaModel, input_ids, attention: str, attention_config: dict, *, remat: str = "none",
                   activation_sharding=None):
    """The model's final-norm hidden states and per-layer aux, each decoder layer under ``jax.checkpoint``.

    The same computation as ``LlamaModel.hidden_states`` (no padding, default positions); ``remat`` picks the
    policy of :data:`REMAT_POLICIES`, and ``activation_sharding`` pins the residual stream between layers.
    """
    if remat not in REMAT_POLICIES:
        raise FinetuneError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    config = model.config
    fn = get_attention(attention)
    from seerjax.rope import rope_frequencies

    rope = rope_frequencies(config.rope, config.head_dim)
    b, t = input_ids.shape
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x_btd = jnp.take(model.embed[...], input_ids, axis=0).astype(model.dtype)
    aux_per_layer = []
    mesh = attention_config.get("mesh")
    gather_low = mesh is not None and jnp.dtype(model.dtype) != jnp.dtype(jnp.float32)
    for layer in model.layers:
        graphdef, state = nnx.split(layer)

        def call(state, x_btd, positions_bt, graphdef=graphdef):
            if gather_low:  # fsdp gathers the weights in the compute dtype; gates keep theirs
                state = shd.cast_in_place(state, model.dtype, mesh, keep=lambda v: isinstance(v, GateParam))
            return nnx.merge(graphdef, state)(x_btd, positions_bt, None, fn, attention_config, rope, config)

        if remat != "none":
            call = jax.checkpoint(call, policy=REMAT_POLICIES[remat], prevent_cse=True)
        with jax.named_scope(f"layer_{layer.attn.layer}"):
            x_btd, aux = call(state, x_btd, positions_bt)
        if activation_sharding is not None:
            x_btd = jax.lax.with_sharding_constraint(x_btd, activation_sharding)
        aux_per_layer.append(aux)
    return model.final_norm(x_btd), aux_per_layer


def lm_loss(model: LlamaModel, hidden_btd, targets_bt, *, chunk: int = 0, mesh=None) -> jax.Array:
    """Mean next-token cross-entropy (float32). With ``0 < chunk < T`` the logits are made ``chunk`` positions at
    a time (rematerialized in the backward pass), so ``[B, T, vocab]`` is never held at once.

    With a ``mesh`` whose batch axes split the batch (and no tensor axis), the loss runs per device under
    ``shard_map``: the LM head is all-gathered once (in the compute dtype) and its gradient reduced once, instead
    of once per chunk in each direction, which is what the partitioner made of the chunk loop over a sharded
    head (an all-gather and a full-size gradient all-reduce per chunk, seen in the compiled step)."""
    head = model.embed if model.lm_head is None else model.lm_head
    b, t = targets_bt.shape
    batch_shards = 1 if mesh is None else math.prod(mesh.shape.get(a, 1) for a in shd.BATCH_AXES)
    if mesh is None or batch_shards == 1 or mesh.shape.get("tensor", 1) != 1 or b % batch_shards:
        return _ce_sum(hidden_btd, targets_bt, head[...], model.dtype, chunk) / (b * t)
    w_ve = shd.cast_in_place(head, model.dtype, mesh)[...] if jnp.dtype(model.dtype) != jnp.float32 else head[...]

    def per_device(h, y, w):
        return jax.lax.psum(_ce_sum(h, y, w, model.dtype, chunk), shd.BATCH_AXES)

    total = shd.shard_map(
        per_device, mesh=mesh, in_specs=(P(shd.BATCH_AXES, None, None), P(shd.BATCH_AXES, None), P()), out_specs=P()
    )(hidden_btd, targets_bt, w_ve)
    return total / (b * t)


def _ce_sum(hidden_btd, targets_bt, w_ve, dtype, chunk: int) -> jax.Array:
    """Summed cross-entropy of ``targets_bt`` under the logits of ``hidden_btd`` through ``w_ve``, chunked."""
    b, t, e = hidden_btd.shape
    if not chunk or chunk >= t:
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(lm_logits(hidden_btd, w_ve, dtype), targets_bt))
    n = -(-t // chunk)
    pad = n * chunk - t
    h_nbce = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, e).swapaxes(0, 1)
    y_nbc = jnp.pad(targets_bt, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    w_n1c = (jnp.arange(n * chunk) < t).reshape(n, 1, chunk)

    @jax.checkpoint
    def body(total, xs):
        h, y, w = xs
        ce = optax.softmax_cross_entropy_with_integer_labels(lm_logits(h, w_ve, dtype), y)
        return total + jnp.sum(jnp.where(w, ce, 0.0)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_nbce, y_nbc, w_n1c))
    return total


# -- optimizer and step ----------------------------------------------------------------------------------


def _schedule(peak: float, s: FinetuneSettings):
    warmup = min(s.warmup, max(s.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(s.steps, warmup + 1), end_value=0.0)


def make_optimizer(s: FinetuneSettings) -> optax.GradientTransformation:
    """AdamW for ``{"gates": ..., "params": ...}``: the model with ``lr``, weight decay and global-norm clipping,
    the gates with ``gate_lr`` and no decay (the seed's gate recipe); warm-up then cosine to 0 for both."""
    model_tx = optax.adamw(_schedule(s.lr, s), weight_decay=s.weight_decay)
    if s.clip > 0:
        model_tx = optax.chain(optax.clip_by_global_norm(s.clip), model_tx)
    groups = {"gates": optax.adamw(_schedule(s.gate_lr, s), weight_decay=0.0), "params": model_tx}

    def init(trainable):
        return {k: tx.init(trainable[k]) for k, tx in groups.items()}

    def update(grads, state, trainable=None):
        out = {k: tx.update(grads[k], state[k], None if trainable is None else trainable[k]) for k, tx in groups.items()}
        return {k: u for k, (u, _) in out.items()}, {k: st for k, (_, st) in out.items()}

    return optax.GradientTransformation(init, update)


def make_train_step(graphdef, gate_config: GateConfig, tx, s: FinetuneSettings, mesh, shardings=None):
    """``step(trainable, opt_state, rest, tokens[accum, B, T]) -> (trainable, opt_state, metrics)``, jitted.

    ``trainable`` is ``{"gates": ..., "params": ...}``; ``shardings`` (trainable, opt_state, rest) fixes the in
    and out shardings; trainable and optimizer state are donated.
    """
    attention = shd.sharded_attention(ATTENTION_MODES[s.attention])
    attention_config = {
        "implementation": s.implementation,
        "density": s.density,
        "gate_loss": s.gate_loss_scale > 0,
        "dense": dense_attention_name(s),
        "mesh": mesh if mesh.size > 1 else None,
    }
    activations = None
    if mesh.size > 1:
        activations = NamedSharding(mesh, P(shd.BATCH_AXES, None, None))

    def loss_fn(trainable, rest, tokens_bt):
        model = nnx.merge(graphdef, trainable["gates"], trainable["params"], rest)
        hidden_btd, aux = forward_hidden(
            model, tokens_bt, attention, attention_config, remat=s.remat, activation_sharding=activations
        )
        lm = lm_loss(model, hidden_btd[:, :-1], tokens_bt[:, 1:], chunk=s.loss_chunk, mesh=attention_config["mesh"])
        if s.gate_loss_scale > 0:
            gate = distill_loss(aux, gate_config, loss_scale=s.gate_loss_scale, skip_fraction=s.skip_fraction)
        else:
            gate = jnp.zeros((), jnp.float32)
        densities = [jnp.mean(a["density"]) for a in aux if "density" in a]
        density = jnp.mean(jnp.stack(densities)) if densities else jnp.ones((), jnp.float32)
        return lm + gate, {"lm_loss": lm, "gate_loss": gate, "density": density}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, rest, tokens_abt):
        def micro(carry, tokens_bt):
            (loss, parts), grads = grad_fn(trainable, rest, tokens_bt)
            return jax.tree.map(jnp.add, carry, ({"loss": loss, **parts}, grads)), None

        zero_metrics = {k: jnp.zeros((), jnp.float32) for k in ("loss", "lm_loss", "gate_loss", "density")}
        zero = (zero_metrics, jax.tree.map(jnp.zeros_like, trainable))
        (metric_sum, grad_sum), _ = jax.lax.scan(micro, zero, tokens_abt)
        n = tokens_abt.shape[0]
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {k: v / n for k, v in metric_sum.items()}
        metrics["grad_norm"] = optax.global_norm(grads["params"])
        return trainable, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    train_sh, opt_sh, rest_sh = shardings
    tokens_sh = NamedSharding(mesh, P(None, shd.BATCH_AXES, None))
    return jax.jit(
        step,
        in_shardings=(train_sh, opt_sh, rest_sh, tokens_sh),
        out_shardings=(train_sh, opt_sh, shd.replicated(mesh)),
        donate_argnums=(0, 1),
    )


# -- setting up a run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """What the training loop holds: the placed state, its shardings and the jitted step."""

    model: LlamaModel
    graphdef: Any
    trainable: dict
    opt_state: Any
    rest: Any
    shardings: tuple
    step_fn: Any
    tx: Any
    mesh: Any
    gate_config: GateConfig


def check_mesh_fits(config: ModelConfig, gate_config: GateConfig, s: FinetuneSettings, mesh) -> None:
    """Every parameter and the batch against the mesh, from shapes only (before any weight is read)."""
    shd.check_batch(s.batch, mesh)
    shd.tree_specs(nnx.state(abstract_model(config, gate_config, resolve_dtype(s.dtype))), mesh)


def setup(model: LlamaModel, s: FinetuneSettings, mesh, tx=None) -> TrainState:
    """Places ``model`` (with gates attached) and a fresh optimizer state on ``mesh``; builds the step.

    ``tx`` replaces the optimizer of :func:`make_optimizer` (it sees ``{"gates": ..., "params": ...}``).
    """
    from seerjax.gates_io import model_gates

    gate_config = model_gates(model)[0].config
    graphdef, gates, params, rest = nnx.split(model, GateParam, nnx.Param, ...)
    trainable = {"gates": gates, "params": params}
    train_sh = shd.tree_shardings(trainable, mesh)
    rest_sh = shd.tree_shardings(rest, mesh)
    trainable = shd.put_tree(trainable, train_sh)
    rest = shd.put_tree(rest, rest_sh)
    tx = make_optimizer(s) if tx is None else tx
    opt_sh = shd.tree_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    shardings = (train_sh, opt_sh, rest_sh)
    step_fn = make_train_step(graphdef, gate_config, tx, s, mesh, shardings)
    return TrainState(model, graphdef, trainable, opt_state, rest, shardings, step_fn, tx, mesh, gate_config)


def load_model(s: FinetuneSettings, model: LlamaModel | None = None) -> LlamaModel:
    """The model to fine-tune: from ``s.model`` (or the given one), re-configured (YaRN), with ``s.gates``."""
    from seerjax.gates_io import load_gates

    if model is None:
        from seerjax.hf import from_pretrained

        base = ModelConfig.from_json(s.model)
        target = target_config(base, s)
        model = from_pretrained(s.model, dtype=jnp.float32, rope=target.rope,
                                max_position_embeddings=target.max_position_embeddings)
    else:
        target = target_config(model.config, s)
    model = prepare_model(model, target, resolve_dtype(s.dtype))
    load_gates(model, s.gates)
    return model


# -- checkpoints -----------------------------------------------------------------------------------------


def save_checkpoint(manager, step: int, state: TrainState, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(
            trainable=ocp.args.StandardSave(state.trainable),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def restore_checkpoint(manager, step: int, state: TrainState) -> dict:
    """Restores ``step`` into ``state`` with the shardings of ``state``'s mesh (any mesh shape); returns meta."""
    import orbax.checkpoint as ocp

    train_sh, opt_sh, _ = state.shardings
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            trainable=ocp.args.StandardRestore(shd.abstract_tree(state.trainable, train_sh)),
            opt_state=ocp.args.StandardRestore(shd.abstract_tree(state.opt_state, opt_sh)),
            meta=ocp.args.JsonRestore(),
        ),
    )
    state.trainable, state.opt_state = restored["trainable"], restored["opt_state"]
    return restored["meta"]


def _json_normalized(x):
    return json.loads(json.dumps(x))


# -- the run ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneResult:
    out: str
    steps: int
    final_loss: float
    metrics: list
    mesh: str


def finetune(s: FinetuneSettings, *, model: LlamaModel | None = None, data=None) -> FinetuneResult:
    """Fine-tunes; resumes from ``s.out`` when a checkpoint is there; exports the model and gates into ``s.out``.

    ``model`` (a seerjax model, without gates) and ``data`` (a ``PackedSequences``) may be given directly, e.g.
    from tests; otherwise they come from ``s.model`` and ``s.data``. The gates always come from ``s.gates``.
    """
    from seerjax.gates_io import check_gates_fit_model, read_gate_config
    from seerjax.train.data import load_tokenizer, packed_from_source

    mesh = shd.make_mesh(s.mesh)
    gate_config = read_gate_config(s.gates)
    base_config = ModelConfig.from_json(s.model) if model is None else model.config
    config = target_config(base_config, s)
    check_gates_fit_model(
        gate_config, num_layers=config.num_layers, num_q_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
    if s.seq_len < gate_config.block_size:
        raise FinetuneError(
            f"seq_len={s.seq_len} is shorter than one gate block (block_size={gate_config.block_size} from {s.gates})"
        )
    check_mesh_fits(config, gate_config, s, mesh)
    source_dtype = _source_dtype(s.model) if model is None else jnp.dtype(model.param_dtype)
    if data is None:
        data = packed_from_source(s.data, load_tokenizer(s.model), s.seq_len, seed=s.seed)
    if data.seq_len != s.seq_len:
        raise FinetuneError(f"data packs sequences of {data.seq_len} tokens but seq_len={s.seq_len}")

    state = setup(load_model(s, model), s, mesh)
    is_main = jax.process_index() == 0
    if is_main:
        os.makedirs(s.out, exist_ok=True)
    manager = checkpoint_manager(s.out)
    fingerprint = {"model_config": config.to_hf_dict(), "gate_config": gate_config.to_dict(), "seq_len": s.seq_len}
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        meta = restore_checkpoint(manager, latest, state)
        saved = {k: meta.get(k) for k in fingerprint}
        if saved != _json_normalized(fingerprint):
            changed = sorted(k for k in fingerprint if saved[k] != _json_normalized(fingerprint[k]))
            raise FinetuneError(
                f"the checkpoint in {s.out} was made with other settings ({', '.join(changed)} differ); "
                "use another --out or the same settings"
            )
        start = int(meta["step"])
    metrics_path = os.path.join(s.out, METRICS_FILE)
    if is_main:
        rewrite_metrics(metrics_path, start)

    schedule = _schedule(s.lr, s)
    tokens_per_step = s.batch * s.grad_accum * s.seq_len
    records = []
    bar = None
    if s.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
    metrics_file = open(metrics_path, "a") if is_main else None
    try:
        for step in range(start, s.steps):
            position = step * s.batch * s.grad_accum
            tokens = data.batch(position, s.batch * s.grad_accum).reshape(s.grad_accum, s.batch, s.seq_len)
            tokens = shd.put_batch(tokens, mesh, batch_dim=1)
            t0 = time.perf_counter()
            state.trainable, state.opt_state, metrics = state.step_fn(
                state.trainable, state.opt_state, state.rest, tokens
            )
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            dt = time.perf_counter() - t0
            if not np.isfinite(metrics["loss"]):
                raise FinetuneError(f"fine-tuning loss became {metrics['loss']} at step {step + 1}; lower --lr or check the data")
            done = step + 1
            record = {"step": done, **metrics, "lr": float(schedule(step)), "tokens_per_s": tokens_per_step / dt, "step_s": dt}
            records.append(record)
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if done % s.save_every == 0 or done == s.steps:
                meta = {"step": done, "data_position": done * s.batch * s.grad_accum, "mesh": shd.describe(mesh), **fingerprint}
                save_checkpoint(manager, done, state, meta)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
                bar.update(1)
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if bar is not None:
            bar.close()
    manager.wait_until_finished()
    manager.close()
    export(state, s, s.export_dtype or source_dtype)
    final = records[-1]["loss"] if records else float("nan")
    return FinetuneResult(s.out, s.steps, final, records, shd.describe(mesh))


def _source_dtype(model_dir: str):
    """The dtype a HF checkpoint declares (``dtype`` or ``torch_dtype``), float32 if none or unknown."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            d = json.load(f)
        return resolve_dtype(d.get("dtype") or d.get("torch_dtype") or "float32")
    except (OSError, ValueError):
        return jnp.dtype(jnp.float32)


def export(state: TrainState, s: FinetuneSettings, dtype) -> None:
    """Writes the fine-tuned model (HF format, ``dtype``, YaRN rope config) and its gates into ``s.out``."""
    from seerjax.gates_io import model_gates, save_gates
    from seerjax.hf import copy_model_extras, save_pretrained

    dtype = resolve_dtype(dtype, "export_dtype")
    host = shd.host_tree(state.trainable)  # every process takes part in gathering
    if jax.process_index() != 0:
        return
    params = jax.tree.map(lambda x: x.astype(np.dtype(dtype)), host["params"])
    graphdef, _ = nnx.split(abstract_model(state.model.config, None, dtype, param_dtype=dtype))
    save_pretrained(nnx.merge(graphdef, params), s.out)
    copy_model_extras(s.model, s.out)  # tokenizer files and the byte-level tokenizer marker
    nnx.update(state.model, host["gates"])
    extra = {"model": s.model, "data": s.data, "seq_len": s.seq_len, "steps": s.steps, "seed": s.seed,
             "finetuned": True, "attention": s.attention, "density": s.density}
    save_gates(s.out, model_gates(state.model), state.gate_config, extra=extra)
