"""Gate distillation (post-training): train only the AttnGates against the frozen model's own attention.

One step runs the frozen model forward with the ``pooled`` attention, which yields each layer's block
max-pooled attention map (the target) and the gate's logits on stop-gradient q/k. The loss is the seed's:
KL(target ‖ softmax(gate)) per layer, first quarter of query blocks dropped, summed over layers, × 10.
Gradients exist only for gate parameters: the model is split into `GateParam` state (trained, with AdamW
state) and everything else (passed through untouched), so optimizer state is 2× the gate bytes and the base
model never enters autodiff.

Checkpoints (orbax) hold gates, optimizer state, step and data position; re-running the same command after
a crash (even kill -9) resumes and ends with the same gates as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from seerjax.gate import GateConfig, GateParam, gate_kl_loss, gate_targets
from seerjax.train.checkpoints import METRICS_FILE, checkpoint_manager, rewrite_metrics
from seerjax.train.steps import LaggedSteps



class DistillError(ValueError):
    """Bad distillation settings."""


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """Everything a distillation run needs; the CLI flags map one to one onto these fields."""

    model: str
    data: str
    seq_len: int
    steps: int
    out: str
    batch: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    save_every: int = 50
    seed: int = 0
    block_size: int = 64
    gate_heads: str = "query"
    d_gate: int = 128
    gate_type: str = "Qavg_Kmaxminavg"
    q_sub_blocks: int = 1  # the gate's scoring grain (see seerjax.gate): query / key sub-blocks per block
    k_sub_blocks: int = 1
    loss_scale: float = 10.0
    skip_fraction: float = 0.25
    dtype: str = "bfloat16"
    implementation: str | None = None
    mesh: str | None = None
    retrieval_docs: int = 0  # synthetic passkey / key-value / copy documents mixed into the data
    init_gates: str | None = None  # a gates directory to start from (warm start) instead of a random init
    progress: bool = True

    def __post_init__(self):
        positive = ("seq_len", "steps", "batch", "grad_accum", "save_every", "d_gate")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise DistillError(f"{name} must be a positive integer, got {value!r}")
        if self.warmup < 0:
            raise DistillError(f"warmup must be >= 0, got {self.warmup}")
        if not isinstance(self.retrieval_docs, (int, np.integer)) or self.retrieval_docs < 0:
            raise DistillError(f"retrieval_docs must be an integer >= 0, got {self.retrieval_docs!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise DistillError(f"lr must be a positive number, got {self.lr}")
        if self.seq_len < self.block_size:
            raise DistillError(
                f"seq_len={self.seq_len} is shorter than one gate block (block_size={self.block_size}); "
                "distillation needs at least one full block"
            )
        for name in ("q_sub_blocks", "k_sub_blocks"):
            m = getattr(self, name)
            if not isinstance(m, (int, np.integer)) or m < 1 or self.block_size % m:
                raise DistillError(f"{name} must be a positive integer dividing block_size ({self.block_size}), got {m!r}")
        if not 0.0 <= self.skip_fraction < 1.0:
            raise DistillError(f"skip_fraction must be in [0, 1), got {self.skip_fraction}")


def gate_config_from_settings(model_config, s: DistillSettings) -> GateConfig:
    from seerjax.gate import parse_gate_type
    from seerjax.gates_io import gate_config_for_model

    q_pool, k_pool = parse_gate_type(s.gate_type)
    return gate_config_for_model(
        model_config, block_size=s.block_size, d_gate=s.d_gate, q_pooling=q_pool, k_pooling=k_pool, heads=s.gate_heads,
        q_sub_blocks=s.q_sub_blocks, k_sub_blocks=s.k_sub_blocks,
    )


def distill_loss(aux_per_layer, gate_config: GateConfig, *, loss_scale=10.0, skip_fraction=0.25) -> jax.Array:
    """Sum over layers of the gate KL loss, × loss_scale (the seed's ×10)."""
    total = 0.0
    for aux in aux_per_layer:
        target = gate_targets(aux["pooled"], gate_config)
        total = total + gate_kl_loss(aux["gate_logits"], target, skip_fraction=skip_fraction)
    return loss_scale * total


def make_optimizer(s: DistillSettings) -> optax.GradientTransformation:
    """AdamW, linear warm-up then cosine decay to 0, no weight decay (the seed's recipe)."""
    warmup = min(s.warmup, max(s.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, warmup, max(s.steps, warmup + 1), end_value=0.0)
    return optax.adamw(schedule, weight_decay=0.0)


def make_train_step(graphdef, gate_config: GateConfig, tx, s: DistillSettings, mesh=None, shardings=None):
    """`step(gates, opt_state, frozen, tokens[accum, B, T]) -> (gates, opt_state, loss)`, jitted, donating
    the gates and optimizer state. Only `gates` are differentiated. With a `mesh`, attention runs per device
    and `shardings` (gates, opt_state, frozen, tokens) fix the step's in and out shardings."""
    attention, attention_config = "pooled", {"implementation": s.implementation}
    if mesh is not None and mesh.size > 1:
        from seerjax.sharding import sharded_attention

        attention, attention_config["mesh"] = sharded_attention("pooled"), mesh

    def loss_fn(gates, frozen, tokens_bt):
        model = nnx.merge(graphdef, gates, frozen)
        _, aux = model.hidden_states(tokens_bt, attention=attention, attention_config=attention_config)
        return distill_loss(aux, gate_config, loss_scale=s.loss_scale, skip_fraction=s.skip_fraction)

    def step(gates, opt_state, frozen, tokens_abt):
        def micro(carry, tokens_bt):
            loss, grads = jax.value_and_grad(loss_fn)(gates, frozen, tokens_bt)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, gates))
        (loss_sum, grad_sum), _ = jax.lax.scan(micro, zero, tokens_abt)
        n = tokens_abt.shape[0]
        grads = jax.tree.map(lambda g: g / n, grad_sum)
        updates, opt_state = tx.update(grads, opt_state, gates)
        gates = optax.apply_updates(gates, updates)
        return gates, opt_state, loss_sum / n

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    from seerjax.sharding import replicated

    gates_sh, opt_sh, frozen_sh, tokens_sh = shardings
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(gates_sh, opt_sh, frozen_sh, tokens_sh),
                   out_shardings=(gates_sh, opt_sh, replicated(mesh)))


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@dataclasses.dataclass
class DistillResult:
    out: str
    steps: int
    final_loss: float
    losses: list
    gate_bytes: int
    optimizer_bytes: int


def _warm_start(model, gate_config: GateConfig, gates_dir: str) -> None:
    """Attaches trained gates, which must have this run's gate settings (checked before the model is touched)."""
    from seerjax.gates_io import load_gates, read_gate_config

    if not os.path.isdir(gates_dir):
        raise DistillError(f"init_gates={gates_dir!r} is not a directory (expected a gates directory with gate_config.json)")
    found = read_gate_config(gates_dir)
    if not found.same_but_grain(gate_config):  # the scoring grain may differ: the tensors keep their shapes
        raise DistillError(
            f"init_gates={gates_dir!r} holds gates made with other settings ({found.to_dict()}) than this run's "
            f"({gate_config.to_dict()}); match --gate-heads, --d-gate, --gate-type and --block-size to them"
        )
    load_gates(model, gates_dir, config=gate_config)


def distill(s: DistillSettings, *, model=None, data=None) -> DistillResult:
    """Trains AttnGates; resumes from `s.out` when a checkpoint is there. Returns the losses and sizes.

    `model` (a seerjax model) and `data` (a `PackedSequences`) may be given directly, e.g. from tests;
    otherwise they come from `s.model` and `s.data`.
    """
    import orbax.checkpoint as ocp

    from seerjax import sharding as shd
    from seerjax import sparse_attention  # noqa: F401  (registers the "pooled" attention)
    from seerjax.gates_io import attach_gates, save_gates
    from seerjax.train.data import load_tokenizer, packed_from_source

    if model is None:
        from seerjax.hf import from_pretrained

        model = from_pretrained(s.model, dtype=s.dtype)
    gate_config = gate_config_from_settings(model.config, s)
    if data is None:
        data = packed_from_source(s.data, load_tokenizer(s.model), s.seq_len, seed=s.seed, retrieval_docs=s.retrieval_docs)
    if data.seq_len != s.seq_len:
        raise DistillError(f"data packs sequences of {data.seq_len} tokens but seq_len={s.seq_len}")
    if s.init_gates:
        _warm_start(model, gate_config, s.init_gates)
    else:
        attach_gates(model, gate_config, seed=s.seed)
    graphdef, gates, frozen = nnx.split(model, GateParam, ...)
    tx = make_optimizer(s)
    mesh = shardings = None
    if s.mesh:
        mesh = shd.make_mesh(s.mesh)
        shd.check_batch(s.batch, mesh)
        gates_sh, frozen_sh = shd.tree_shardings(gates, mesh), shd.tree_shardings(frozen, mesh)
        gates, frozen = shd.put_tree(gates, gates_sh), shd.put_tree(frozen, frozen_sh)
        opt_sh = shd.tree_shardings(jax.eval_shape(tx.init, gates), mesh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(gates)
        shardings = (gates_sh, opt_sh, frozen_sh, shd.batch_sharding(mesh, 3, batch_dim=1))
    else:
        opt_state = tx.init(gates)
    step_fn = make_train_step(graphdef, gate_config, tx, s, mesh, shardings)

    os.makedirs(s.out, exist_ok=True)
    manager = checkpoint_manager(s.out)
    start = 0
    latest = manager.latest_step()
    if latest is not None:
        restored = manager.restore(
            latest,
            args=ocp.args.Composite(
                gates=ocp.args.StandardRestore(gates),
                opt_state=ocp.args.StandardRestore(opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
        gates, opt_state = restored["gates"], restored["opt_state"]
        meta = restored["meta"]
        if meta.get("gate_config") != gate_config.to_dict():
            raise DistillError(
                f"the checkpoint in {s.out} was made with other gate settings ({meta.get('gate_config')}); "
                "use another --out or the same settings"
            )
        start = int(meta["step"])
        if start > s.steps:
            raise DistillError(
                f"the checkpoint in {s.out} is at step {start}, past steps={s.steps}; ask for at least {start} steps "
                f"(exactly {start} exports its gates without training) or use another --out"
            )
    metrics_path = os.path.join(s.out, METRICS_FILE)
    rewrite_metrics(metrics_path, start)

    tokens_per_step = s.batch * s.grad_accum * s.seq_len
    losses = []
    bar = None
    if s.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s.steps, initial=start, desc="distill", unit="step", dynamic_ncols=True)
    with open(metrics_path, "a") as metrics:

        def on_step(done, loss, dt):
            if not np.isfinite(loss):
                raise DistillError(f"distillation loss became {loss} at step {done}; lower --lr or check the data")
            losses.append(loss)
            record = {"step": done, "loss": loss, "tokens_per_s": tokens_per_step / dt, "step_s": dt}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
                bar.update(1)

        lagged = LaggedSteps(on_step)  # step k's loss is read after step k + 1 is dispatched
        for step in range(start, s.steps):
            position = step * s.batch * s.grad_accum
            tokens = data.batch(position, s.batch * s.grad_accum).reshape(s.grad_accum, s.batch, s.seq_len)
            tokens = jnp.asarray(tokens) if mesh is None else shd.put_batch(tokens, mesh, batch_dim=1)
            gates, opt_state, loss = step_fn(gates, opt_state, frozen, tokens)
            done = step + 1
            lagged.push(done, loss)
            if done % s.save_every == 0 or done == s.steps:
                lagged.flush()  # checked and logged before it is saved
                meta = {"step": done, "data_position": done * s.batch * s.grad_accum, "gate_config": gate_config.to_dict()}
                manager.save(
                    done,
                    args=ocp.args.Composite(
                        gates=ocp.args.StandardSave(gates),
                        opt_state=ocp.args.StandardSave(opt_state),
                        meta=ocp.args.JsonSave(meta),
                    ),
                    force=True,
                )
        lagged.flush()
    if bar is not None:
        bar.close()
    manager.wait_until_finished()
    manager.close()
    nnx.update(model, gates)
    from seerjax.gates_io import model_gates

    save_gates(
        s.out,
        model_gates(model),
        gate_config,
        extra={"model": s.model, "data": s.data, "seq_len": s.seq_len, "steps": s.steps, "seed": s.seed,
               "init_gates": s.init_gates},
    )
    final = losses[-1] if losses else float("nan")
    return DistillResult(s.out, s.steps, final, losses, tree_bytes(gates), tree_bytes(opt_state))
