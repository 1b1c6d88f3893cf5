"""Device meshes, the logical-axis sharding rules, and per-device attention under ``shard_map``.

One mesh shape serves fine-tuning, distillation and evaluation: three named axes ``(data, fsdp, tensor)``,
written as ``"data=2,fsdp=4,tensor=1"`` (axes left out have size 1; one axis may be ``-1``, "the remaining
devices"). The batch is split over ``data × fsdp``; parameters are split over ``fsdp`` (ZeRO-3 style: XLA
gathers each weight where it is used) and ``tensor`` (heads and MLP columns, Megatron style).

Parameters name their dimensions with logical axes in their ``out_sharding`` metadata (see
:mod:`seerjax.model`); :data:`RULES` is the one table that maps those names to mesh axes. Parameters, optimizer
state (whose moments keep the parameters' metadata) and batches are all placed from it, and every parameter is
checked against it before anything is placed, so a mesh that does not fit the model fails with the parameter,
its dimension and the mesh axis named.

Pallas kernels cannot be split by XLA's partitioner, so attention runs per device: :func:`sharded_attention`
registers a wrapper around any registered attention function that, when ``attention_config["mesh"]`` is set,
runs it under ``shard_map`` over batch (``data``, ``fsdp``) and heads (``tensor``). Everything an attention
function does (gate pooling, projections, selection, kernels) is local to one sequence and one head group, so
the per-device result is exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seerjax.errors import SeerjaxError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis → mesh axis (or axes, or None: replicated). The only place where sharding is decided.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
)
# Logical axes that stay whole when their mesh axis does not divide them, instead of being an error: a
# vocabulary such as the byte models' 257 is rarely a multiple of the tensor size, and an embedding table is
# small next to the layers. Every other axis must divide evenly.
REPLICATE_IF_UNEVEN = frozenset({"vocab"})

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


class ShardingError(SeerjaxError):
    """A mesh that is malformed, needs more devices than there are, or does not fit the model or batch."""


# -- meshes ---------------------------------------------------------------------------------------------


def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,fsdp=4"`` → ``{"data": 2, "fsdp": 4, "tensor": 1}``.

    One axis may be ``-1``: it takes the devices the others leave (``num_devices`` must then be given).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ShardingError(f"mesh must be a string like 'data=2,fsdp=4,tensor=1', got {spec!r}")
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(-?\d+)\s*", part)
        if m is None:
            raise ShardingError(
                f"mesh {spec!r} is malformed at {part.strip()!r}: expected comma-separated AXIS=SIZE entries, "
                f"e.g. 'data=2,fsdp=4,tensor=1'"
            )
        name, size = m.group(1), int(m.group(2))
        if name not in MESH_AXES:
            raise ShardingError(f"mesh {spec!r} names an unknown axis {name!r}; the axes are {list(MESH_AXES)}")
        if name in sizes:
            raise ShardingError(f"mesh {spec!r} gives axis {name!r} twice")
        if size < 1 and size != -1:
            raise ShardingError(f"mesh {spec!r}: axis {name} must have a size >= 1 (or -1 for the rest), got {size}")
        sizes[name] = size
    wild = [n for n, v in sizes.items() if v == -1]
    if len(wild) > 1:
        raise ShardingError(f"mesh {spec!r}: only one axis may be -1, got {wild}")
    full = {name: sizes.get(name, 1) for name in MESH_AXES}
    if wild:
        if num_devices is None:
            raise ShardingError(f"mesh {spec!r}: an axis of size -1 needs the device count")
        rest = math.prod(v for v in full.values() if v != -1)
        if num_devices % rest:
            raise ShardingError(
                f"mesh {spec!r}: the other axes use {rest} devices, which does not divide the {num_devices} devices present"
            )
        full[wild[0]] = num_devices // rest
    return full


def make_mesh(spec: str | Mapping[str, int] | None = None, *, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes ``(data, fsdp, tensor)`` from a spec such as ``"data=2,fsdp=4"``.

    ``spec=None`` is one device. The mesh may use fewer devices than there are (the first ones); more is an
    error. With every device of a multi-host run, the device order follows the interconnect topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec is None:
        sizes = {name: 1 for name in MESH_AXES}
    elif isinstance(spec, Mapping):
        sizes = parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()), len(devices))
    else:
        sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    n = math.prod(shape)
    if n > len(devices):
        raise ShardingError(
            f"mesh {describe_sizes(sizes)} needs {n} devices, but only {len(devices)} are present "
            f"({devices[0].platform if devices else 'none'}); use a mesh whose sizes multiply to at most {len(devices)}"
        )
    if n == len(devices) and n > 1:
        from jax.experimental import mesh_utils

        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
        grid = np.asarray(devices[:n], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def describe_sizes(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{name}={sizes[name]}" for name in MESH_AXES)


def describe(mesh: Mesh) -> str:
    """``"data=2,fsdp=4,tensor=1"``."""
    return describe_sizes(dict(mesh.shape))


def batch_divisor(mesh: Mesh) -> int:
    """How many ways the batch is split: ``data × fsdp``."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch: int, mesh: Mesh, name: str = "batch") -> None:
    """The global batch must split evenly over ``data × fsdp``."""
    d = batch_divisor(mesh)
    if batch % d:
        raise ShardingError(
            f"{name}={batch} must be divisible by data×fsdp = {d} of mesh {describe(mesh)} (each of the {d} batch "
            f"shards gets batch/{d} sequences); use a multiple of {d}"
        )


# -- rules: logical axes → mesh axes --------------------------------------------------------------------


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(
    logical: tuple, shape: tuple[int, ...], mesh: Mesh, *, name: str = "array", rules=RULES
) -> P:
    """The PartitionSpec of one array whose dimensions carry the logical names ``logical`` (None: whole).

    Raises a ShardingError naming the array, its dimension and the mesh axis when a mesh axis does not divide
    the dimension it would split (axes in :data:`REPLICATE_IF_UNEVEN` are kept whole instead).
    """
    table = dict(rules)
    if len(logical) != len(shape):
        raise ShardingError(f"{name} has shape {tuple(shape)} but {len(logical)} logical axes {tuple(logical)}")
    used: set[str] = set()
    entries = []
    for dim, (axis, size) in enumerate(zip(logical, shape, strict=True)):
        if axis is None:
            entries.append(None)
            continue
        if axis not in table:
            raise ShardingError(f"{name} dim {dim} has logical axis {axis!r}, which the sharding rules do not know: {sorted(table)}")
        mesh_axes = table[axis]
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)  # a mesh axis splits one dimension at most
        n = _axis_size(mesh, mesh_axes)
        if not mesh_axes or n == 1:
            entries.append(None)
            continue
        if size % n:
            if axis in REPLICATE_IF_UNEVEN:
                entries.append(None)
                continue
            shown = "×".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
            raise ShardingError(
                f"parameter {name} dim {dim} ({axis}, size {size}) is not divisible by mesh axis {shown} "
                f"(mesh {describe(mesh)}); the {'×'.join(mesh_axes)} size must divide {size}"
            )
        used.update(mesh_axes)
        entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*entries)


def variable_axes(var: nnx.Variable) -> tuple | None:
    """A Variable's logical axes (its ``out_sharding`` metadata), or None."""
    meta = var.get_metadata()
    axes = meta.get("out_sharding") if isinstance(meta, Mapping) else None
    return tuple(axes) if axes else None


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return ".".join(p for p in parts if p not in ("value", "raw_value"))


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def tree_specs(tree, mesh: Mesh, *, rules=RULES):
    """PartitionSpecs for a tree of nnx Variables and arrays (model state, optimizer state).

    A Variable with logical axes gets the spec the rules give (checked against its shape); any other array,
    e.g. an optimizer step count, is replicated. Variables are kept, holding their spec, so the result has
    the tree structure of ``tree`` as jit's shardings need it.
    """

    def spec(path, x):
        return x.replace(_variable_spec(path, x, mesh, rules)) if _is_var(x) else P()

    return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_is_var)


def _variable_spec(path, var: nnx.Variable, mesh: Mesh, rules) -> P:
    """The PartitionSpec the rules give a Variable (replicated when it has no logical axes)."""
    axes = variable_axes(var)
    if axes is None:
        return P()
    shape = tuple(getattr(var.get_value(), "shape", ()))
    return logical_to_spec(axes, shape, mesh, name=_path_name(path), rules=rules)


def cast_in_place(tree, dtype, mesh: Mesh, *, keep=lambda var: False, rules=RULES):
    """Each float32 matrix Variable of ``tree`` (ndim ≥ 2, ``keep(var)`` false) cast to ``dtype`` on its own shard.

    Inside jit, a sharded float32 weight that a bf16 matmul needs whole is otherwise all-gathered in float32 and
    cast afterwards; cast first (pinned to the weight's sharding) and fsdp moves half the bytes, forward and
    backward (the gradient's reduce-scatter is then in ``dtype`` too). Vectors (norm scales) keep their dtype.
    """

    def cast(path, x):
        if not _is_var(x) or keep(x):
            return x
        value = x.get_value()
        if getattr(value, "ndim", 0) < 2 or value.dtype != jnp.float32:
            return x
        sharding = NamedSharding(mesh, _variable_spec(path, x, mesh, rules))
        return x.replace(jax.lax.with_sharding_constraint(value.astype(dtype), sharding))

    return jax.tree_util.tree_map_with_path(cast, tree, is_leaf=_is_var)


def tree_shardings(tree, mesh: Mesh, *, rules=RULES):
    """NamedShardings (on ``mesh``) with the tree structure of ``tree``; see :func:`tree_specs`."""
    specs = tree_specs(tree, mesh, rules=rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(mesh: Mesh, ndim: int, batch_dim: int = 0) -> P:
    """Batch dimension split over ``data × fsdp``, the others whole."""
    entries = [None] * ndim
    entries[batch_dim] = BATCH_AXES
    return P(*entries)


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, ndim, batch_dim))


def put_batch(array, mesh: Mesh, batch_dim: int = 0) -> jax.Array:
    """A host array holding the *global* batch → a global jax.Array split over ``data × fsdp``.

    Every process passes the same global array (the data pipeline is deterministic); each one uploads only
    the shards of its own devices, so this works on one host and on many.
    """
    array = np.asarray(array)
    check_batch(array.shape[batch_dim], mesh)
    sharding = batch_sharding(mesh, array.ndim, batch_dim)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, shardings):
    """``jax.device_put`` of a tree (arrays or Variables) onto matching shardings."""
    return jax.device_put(tree, shardings)


def abstract_tree(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: the restore target of an orbax checkpoint."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def host_tree(tree):
    """Every array of ``tree`` as a numpy array on this host (gathered from all processes when needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


# -- multi-host -----------------------------------------------------------------------------------------


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when the environment describes a multi-process run.

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
    must run before any other JAX call. Returns whether it initialized.
    """
    env = os.environ if environ is None else environ
    if not env.get(_ENV_COORDINATOR):
        return False
    missing = [k for k in (_ENV_NUM_PROCESSES, _ENV_PROCESS_ID) if not env.get(k)]
    if missing:
        raise ShardingError(
            f"{_ENV_COORDINATOR} is set ({env[_ENV_COORDINATOR]!r}) but {', '.join(missing)} "
            "is not; a multi-process run needs all three"
        )
    try:
        num, pid = int(env[_ENV_NUM_PROCESSES]), int(env[_ENV_PROCESS_ID])
    except ValueError:
        raise ShardingError(
            f"{_ENV_NUM_PROCESSES}={env[_ENV_NUM_PROCESSES]!r} and {_ENV_PROCESS_ID}={env[_ENV_PROCESS_ID]!r} "
            "must be integers"
        ) from None
    if not 0 <= pid < num:
        raise ShardingError(f"{_ENV_PROCESS_ID}={pid} must be in [0, {_ENV_NUM_PROCESSES}={num})")
    jax.distributed.initialize(coordinator_address=env[_ENV_COORDINATOR], num_processes=num, process_id=pid)
    return True


# -- per-device attention -------------------------------------------------------------------------------


def shard_map(f, *, mesh: Mesh, in_specs, out_specs, check: bool = False):
    """``jax.shard_map`` where it exists (jax >= 0.7), else ``jax.experimental.shard_map.shard_map``."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=check)


def _batch_axes_for(mesh: Mesh, batch: int) -> tuple[str, ...] | None:
    """The largest of (data, fsdp), (data,), (fsdp,) that divides ``batch`` (None: the batch stays whole)."""
    for axes in (BATCH_AXES, ("data",), ("fsdp",)):
        n = _axis_size(mesh, axes)
        if n > 1 and batch % n == 0:
            return axes
    return None


def _gate_state_specs(state, heads: str | None):
    """Gate parameters split on their head axis (logical q_heads/kv_heads) over ``heads``; the rest whole."""

    def spec(x):
        axes = variable_axes(x) if _is_var(x) else None
        if axes is None:
            return x.replace(P()) if _is_var(x) else P()
        return x.replace(P(*(heads if a in ("q_heads", "kv_heads") else None for a in axes)))

    return jax.tree.map(spec, state, is_leaf=_is_var)


def attention_per_device(fn, inputs, mesh: Mesh):
    """Runs the attention function ``fn`` on each device's shard of ``inputs`` (an AttentionInputs).

    Batch is split over (data, fsdp) — or the part of it that divides the batch — and heads over ``tensor``
    when it divides both head counts. The layer's gate is split with its heads and sees a config with the
    local head counts. Aux outputs are, by convention, ``[B, heads, ...]`` or ``[B, ...]`` arrays, which come
    back split the same way; any other float aux (a scalar) is averaged over the devices.
    """
    b, t, hq, _ = inputs.q.shape
    hkv = inputs.k.shape[2]
    if mesh.size == 1:
        return fn(dataclasses.replace(inputs, config=_without_mesh(inputs.config)))
    batch_axes = _batch_axes_for(mesh, b)
    tp = mesh.shape["tensor"]
    gate = inputs.gate
    gate_heads = gate.config.gate_heads if gate is not None else hkv
    heads = "tensor" if tp > 1 and hq % tp == 0 and hkv % tp == 0 and gate_heads % tp == 0 else None
    nb = _axis_size(mesh, batch_axes)
    nh = tp if heads else 1
    b_l, hq_l, hkv_l = b // nb, hq // nh, hkv // nh

    arrays = {"q": inputs.q, "k": inputs.k, "v": inputs.v, "q_nope": inputs.q_nope, "k_nope": inputs.k_nope,
              "positions": inputs.positions}
    specs = {name: P(batch_axes, None, heads, None) for name in ("q", "k", "v", "q_nope", "k_nope")}
    specs["positions"] = P(batch_axes, None)
    if inputs.lengths is not None:
        arrays["lengths"], specs["lengths"] = inputs.lengths, P(batch_axes)
    if gate is not None:
        gate_def, gate_state = nnx.split(gate)
        gate_specs = _gate_state_specs(gate_state, heads)
        local_gate_config = dataclasses.replace(gate.config, num_q_heads=hq_l, num_kv_heads=hkv_l)
    else:
        gate_def = gate_state = gate_specs = local_gate_config = None
    config = _without_mesh(inputs.config)

    def local_call(arrays, gate_state):
        local_gate = None
        if gate_def is not None:
            local_gate = nnx.merge(gate_def, gate_state)
            local_gate.config = local_gate_config
        result = fn(dataclasses.replace(inputs, **arrays, gate=local_gate, config=config))
        return result.out, result.aux

    def local_shapes(tree, tree_specs):
        def one(x, spec):
            shape = list(x.shape)
            for dim, axes in enumerate(spec):
                shape[dim] //= _axis_size(mesh, axes)
            return jax.ShapeDtypeStruct(tuple(shape), x.dtype)

        return jax.tree.map(one, tree, tree_specs, is_leaf=lambda x: isinstance(x, P))

    _, aux_shapes = jax.eval_shape(
        local_call, local_shapes(arrays, specs), None if gate is None else local_shapes(gate_state, gate_specs)
    )

    def aux_spec(x):
        if x.ndim >= 1 and x.shape[0] == b_l:
            if x.ndim >= 2 and heads and x.shape[1] in (hq_l, hkv_l):
                return P(batch_axes, heads)
            return P(batch_axes)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ShardingError(f"attention aux output of shape {x.shape} ({x.dtype}) cannot be gathered from the devices")
        return P()

    aux_specs = jax.tree.map(aux_spec, aux_shapes)
    used = tuple(a for a in (*(batch_axes or ()), *((heads,) if heads else ())))

    def body(arrays, gate_state):
        out, aux = local_call(arrays, gate_state)
        aux = jax.tree.map(lambda x, s: jax.lax.pmean(x, used) if s == P() and used else x, aux, aux_specs)
        return out, aux

    mapped = shard_map(
        body,
        mesh=mesh,
        in_specs=(specs, gate_specs),
        out_specs=(P(batch_axes, None, heads, None), aux_specs),
    )
    from seerjax.attention import AttentionOutputs

    out, aux = mapped(arrays, gate_state)
    return AttentionOutputs(out, aux)


def _without_mesh(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if k != "mesh"}


SHARDED_SUFFIX = "@mesh"


def sharded_attention(name: str) -> str:
    """Registers (once) and returns the name of a per-device version of the attention function ``name``.

    The wrapper runs ``name`` under ``shard_map`` when ``attention_config["mesh"]`` holds a Mesh, and as is
    otherwise, so models call it exactly like the original.
    """
    from seerjax.attention import ATTENTION_FNS, get_attention, register_attention

    if name.endswith(SHARDED_SUFFIX):
        return name
    inner = get_attention(name)
    wrapped_name = name + SHARDED_SUFFIX
    if wrapped_name not in ATTENTION_FNS:

        def per_device(inputs):
            mesh = inputs.config.get("mesh")
            if mesh is None:
                return inner(inputs)
            return attention_per_device(inner, inputs, mesh)

        per_device.__doc__ = f"Attention {name!r} run per device under shard_map when a mesh is given."
        register_attention(wrapped_name, per_device)
    return wrapped_name
