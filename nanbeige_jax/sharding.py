"""Logical axis names -> mesh axes; meshes from config; the resolved-sharding report.

Model code names every parameter and main activation dimension with a *logical* axis ("embed", "heads", ...).
A rules table (from config) maps each logical name to a mesh axis (or a tuple of mesh axes, or None for
replicated). This module resolves those names into ``PartitionSpec``/``NamedSharding`` and applies activation
constraints while a ``use_mesh_rules`` context is active; outside such a context constraints are no-ops, so the
model runs unchanged on one device.

Meshes have the axes ("data", "fsdp", "tensor") and *Auto* (GSPMD) axis types: shardings are chosen by the
partitioner from the in/out shardings of the jitted step and the activation constraints, not carried in array
types (``jax.make_mesh``'s default, Explicit axes, would make every contraction over a sharded dimension need an
``out_sharding`` annotation in model code). ``ShardingConfig`` (gin-configurable) holds the mesh sizes and the
rules table; ``configs/sharding/*.gin`` hold the canned tables (``RULE_TABLES`` has the same tables by name).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanbeige_jax.config import gin_dataclass, path_str, strict_replace

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Fully-sharded data parallel over ("data", "fsdp") with tensor parallelism on heads/mlp/vocab.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)

_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("nanbeige_mesh_rules",
                                                                                     default=None)


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec. Unknown names are an error; a mesh axis is used at most once
  per array (a later dimension that maps to an already-used mesh axis is left replicated), and mesh axes of
  size 1 are dropped so specs stay readable. Given the array ``shape``, mesh axes that do not divide a
  dimension are dropped too (e.g. 4 kv heads on an 8-way tensor axis stay replicated)."""
  table = dict(rules)
  used: set[str] = set()
  out: list[MeshAxes] = []
  for dim, name in enumerate(axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    target = table[name]
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1)
    targets = tuple(t for t in targets if t not in used)
    if mesh is not None and shape is not None:
      kept, size = [], 1
      for t in targets:
        if shape[dim] % (size * mesh.shape[t]) == 0:
          kept.append(t)
          size *= mesh.shape[t]
      targets = tuple(kept)
    used.update(targets)
    out.append(None if not targets else targets[0] if len(targets) == 1 else targets)
  while out and out[-1] is None:
    out.pop()
  return PartitionSpec(*out)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
  """Activate activation-sharding constraints (and the mesh) for code traced inside the block."""
  token = _CONTEXT.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _CONTEXT.reset(token)


def current_mesh_rules() -> tuple[Mesh, Rules] | None:
  return _CONTEXT.get()


def target_platform() -> str:
  """The platform the code being traced is compiled for: that of the active mesh's devices (a TPU topology's when
  compiling ahead of time on a CPU host), else JAX's default backend."""
  ctx = _CONTEXT.get()
  if ctx is not None:
    return ctx[0].devices.flat[0].platform
  return jax.default_backend()


def with_logical_constraint(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  ctx = _CONTEXT.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh, x.shape)))


def logical_axes_tree(abstract_state: Any) -> Any:
  """nnx State (of Variables carrying ``logical_axes`` metadata) -> pure nested dict of axis-name tuples."""
  from flax import nnx
  def get(v):
    axes = v.get_metadata().get("logical_axes")
    if axes is None:
      axes = (None,) * len(v.shape)
    return tuple(axes)
  return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(get(v)), abstract_state,
                                       is_leaf=lambda x: isinstance(x, nnx.Variable)))


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES, shapes: Any = None) -> Any:
  """Pure tree of logical-axis tuples (and optionally the matching tree of arrays/ShapeDtypeStructs, whose
  shapes let indivisible dimensions stay replicated) -> tree of NamedShardings."""
  is_axes = lambda x: isinstance(x, tuple)
  if shapes is None:
    return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules, mesh)), axes_tree,
                        is_leaf=is_axes)
  return jax.tree.map(lambda axes, s: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, s.shape)),
                      axes_tree, shapes, is_leaf=is_axes)


def single_device_mesh() -> Mesh:
  import numpy as np
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


# --- meshes -----------------------------------------------------------------------------------------------------
MESH_AXES = ("data", "fsdp", "tensor")


def _resolve_sizes(sizes: dict[str, int], total: int, what: str) -> tuple[int, ...]:
  vals = [int(sizes[a]) for a in MESH_AXES]
  if sum(v == -1 for v in vals) > 1:
    raise ValueError(f"{what}: at most one mesh axis may be -1 (inferred), found {dict(zip(MESH_AXES, vals))}")
  if any(v == 0 or v < -1 for v in vals):
    raise ValueError(f"{what}: mesh axis sizes must be positive or -1, found {dict(zip(MESH_AXES, vals))}")
  known = 1
  for v in vals:
    if v != -1:
      known *= v
  if -1 in vals:
    if total % known:
      raise ValueError(f"{what}: {total} devices cannot be split as {dict(zip(MESH_AXES, vals))} "
                       f"({total} is not divisible by {known})")
    vals[vals.index(-1)] = total // known
  elif known != total:
    raise ValueError(f"{what}: mesh {dict(zip(MESH_AXES, vals))} needs {known} devices but {total} are available")
  return tuple(vals)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, dcn_data: int = 1, dcn_fsdp: int = 1,
              dcn_tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto (GSPMD) axis types.

  ``data``/``fsdp``/``tensor`` are the sizes within a slice (ICI); ``dcn_*`` the sizes across slices (DCN) for
  multi-slice pods, laid out with ``mesh_utils.create_hybrid_device_mesh``. One ICI size may be -1 (inferred).
  """
  import numpy as np
  from jax.experimental import mesh_utils
  devices = list(devices if devices is not None else jax.devices())
  dcn = (int(dcn_data), int(dcn_fsdp), int(dcn_tensor))
  num_slices = dcn[0] * dcn[1] * dcn[2]
  if len(devices) % num_slices:
    raise ValueError(f"mesh: {len(devices)} devices are not divisible into {num_slices} DCN slices {dcn}")
  ici = _resolve_sizes({"data": data, "fsdp": fsdp, "tensor": tensor}, len(devices) // num_slices, "mesh")
  if num_slices > 1 and all(hasattr(d, "slice_index") for d in devices):
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  elif num_slices > 1:
    # Devices without slice information (CPU, single-slice GPU hosts): consecutive blocks of devices act as
    # slices; each mesh axis is DCN-major (slice index outer, within-slice index inner), as in the hybrid mesh.
    blocks = np.array(devices).reshape(dcn + ici)
    arr = blocks.transpose(0, 3, 1, 4, 2, 5).reshape([a * b for a, b in zip(dcn, ici)])
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.array(devices).reshape(ici)
  return Mesh(arr, MESH_AXES)


# --- rules tables -----------------------------------------------------------------------------------------------
# Every logical axis name the model uses (parameters, activations, KV cache). A rules table must cover all of them.
LOGICAL_AXES = ("batch", "length", "embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm",
                "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab", "cache_length")


def _table(**mapping: MeshAxes) -> Rules:
  missing = sorted(set(LOGICAL_AXES) - set(mapping))
  assert not missing, missing
  return tuple((name, mapping[name]) for name in LOGICAL_AXES)


# Canned tables, by name (the same tables as configs/sharding/<name>.gin; a test keeps them in step).
RULE_TABLES: dict[str, Rules] = {
    # Parameters sharded over "fsdp" along their model dimension; heads/mlp/vocab over "tensor" (Megatron-style).
    "fsdp_tp": DEFAULT_RULES,
    # ZeRO-3 style: parameters and optimizer state sharded over "fsdp", no tensor parallelism.
    "fsdp": _table(batch=("data", "fsdp"), length=None, embed="fsdp", vocab=None, heads=None, kv_heads=None,
                   head_dim=None, mlp=None, layers=None, norm=None, act_embed=None, act_heads=None,
                   act_kv_heads=None, act_mlp=None, act_vocab=None, cache_length=None),
    # Pure data parallelism: every parameter replicated, the batch split over every device.
    "dp": _table(batch=("data", "fsdp", "tensor"), length=None, embed=None, vocab=None, heads=None, kv_heads=None,
                 head_dim=None, mlp=None, layers=None, norm=None, act_embed=None, act_heads=None, act_kv_heads=None,
                 act_mlp=None, act_vocab=None, cache_length=None),
    # Tensor parallelism only (plus data parallelism over "data"/"fsdp"): parameters replicated along embed.
    "tp": _table(batch=("data", "fsdp"), length=None, embed=None, vocab="tensor", heads="tensor",
                 kv_heads="tensor", head_dim=None, mlp="tensor", layers=None, norm=None, act_embed=None,
                 act_heads="tensor", act_kv_heads="tensor", act_mlp="tensor", act_vocab="tensor",
                 cache_length=None),
}


def normalize_rules(rules: Any) -> Rules:
  """A rules table as given by config (lists from gin, a name of a canned table) -> validated ``Rules``.

  Raises ValueError naming the offending entry: not a (name, axes) pair, a duplicate logical name, a mesh axis
  that is not one of MESH_AXES, a mesh axis used twice in one entry, or a logical axis the model uses left out.
  """
  if isinstance(rules, str):
    if rules not in RULE_TABLES:
      raise ValueError(f"unknown sharding rules table {rules!r}; known tables: {sorted(RULE_TABLES)}")
    rules = RULE_TABLES[rules]
  if isinstance(rules, dict):
    rules = tuple(rules.items())
  out: list[tuple[str, MeshAxes]] = []
  seen: set[str] = set()
  for i, entry in enumerate(rules):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
      raise ValueError(f"sharding rules entry {i}: expected a (logical_name, mesh_axes) pair, found {entry!r}")
    name, target = entry
    if name in seen:
      raise ValueError(f"sharding rules: logical axis {name!r} appears more than once")
    seen.add(name)
    if name not in LOGICAL_AXES:
      raise ValueError(f"sharding rules: unknown logical axis {name!r}; the model uses {list(LOGICAL_AXES)}")
    if target is None or isinstance(target, str):
      targets: tuple[str, ...] = () if target is None else (target,)
    elif isinstance(target, (tuple, list)) and all(isinstance(t, str) for t in target):
      targets = tuple(target)
    else:
      raise ValueError(f"sharding rules: {name!r} -> {target!r}: expected None, a mesh axis name or a list of them")
    bad = [t for t in targets if t not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding rules: {name!r} -> {target!r}: unknown mesh axis {bad[0]!r}; "
                       f"mesh axes are {list(MESH_AXES)}")
    if len(set(targets)) != len(targets):
      raise ValueError(f"sharding rules: {name!r} -> {target!r} uses a mesh axis twice")
    out.append((name, None if not targets else targets[0] if len(targets) == 1 else targets))
  missing = [n for n in LOGICAL_AXES if n not in seen]
  if missing:
    raise ValueError(f"sharding rules: no rule for logical axis/axes {missing} (use None to replicate)")
  return tuple(out)


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class ShardingConfig:
  """Mesh sizes and the logical-axis rules table.

  ``data``/``fsdp``/``tensor`` are the mesh sizes within a slice (ICI); one of them may be -1 (inferred from the
  device count). ``dcn_*`` are the sizes across slices (DCN, multi-slice pods; product = number of slices).
  ``rules`` is the name of a canned table (``RULE_TABLES``) or a full table of (logical_name, mesh_axes) pairs.
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  rules: Any = "fsdp_tp"

  def __post_init__(self):
    ici = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    for name, value in ici.items():
      if not isinstance(value, int) or isinstance(value, bool) or (value <= 0 and value != -1):
        raise ValueError(f"ShardingConfig.{name}: expected a positive int or -1 (inferred), found {value!r}")
    if sum(v == -1 for v in ici.values()) > 1:
      raise ValueError(f"ShardingConfig: at most one of data/fsdp/tensor may be -1, found {ici}")
    for name in ("dcn_data", "dcn_fsdp", "dcn_tensor"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ShardingConfig.{name}: expected a positive int, found {value!r}")
    object.__setattr__(self, "rules", normalize_rules(self.rules))

  @property
  def num_slices(self) -> int:
    return self.dcn_data * self.dcn_fsdp * self.dcn_tensor

  def make_mesh(self, devices: Sequence[Any] | None = None) -> Mesh:
    """The mesh over ``devices`` (default: all global devices). Sizes that do not divide the device count are a
    one-line ValueError."""
    return make_mesh(self.data, self.fsdp, self.tensor, dcn_data=self.dcn_data, dcn_fsdp=self.dcn_fsdp,
                     dcn_tensor=self.dcn_tensor, devices=devices)

  def replace(self, **changes: Any) -> "ShardingConfig":
    return strict_replace(self, **changes)


# --- resolved-sharding report -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardingRow:
  path: str
  shape: tuple[int, ...]
  dtype: str
  spec: str
  bytes_total: int
  bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """Per-parameter PartitionSpec and bytes per device, with totals for params and optimizer state.

  ``*_per_device`` totals are the bytes on the most loaded device (shards of indivisible or replicated arrays
  are counted in full on every device that holds them)."""
  mesh_shape: dict[str, int]
  rows: tuple[ShardingRow, ...]
  param_bytes_total: int
  param_bytes_per_device: int
  opt_bytes_total: int
  opt_bytes_per_device: int

  def to_json(self) -> dict[str, Any]:
    return {"mesh": dict(self.mesh_shape),
            "params": {r.path: {"shape": list(r.shape), "dtype": r.dtype, "spec": r.spec,
                                "bytes_per_device": r.bytes_per_device} for r in self.rows},
            "param_bytes_total": self.param_bytes_total, "param_bytes_per_device": self.param_bytes_per_device,
            "opt_bytes_total": self.opt_bytes_total, "opt_bytes_per_device": self.opt_bytes_per_device}


def spec_str(spec: PartitionSpec) -> str:
  """A compact, stable text form of a PartitionSpec: P('fsdp', None, ('data', 'tensor'))."""
  parts = []
  for entry in spec:
    if entry is None:
      parts.append("None")
    elif isinstance(entry, str):
      parts.append(repr(entry))
    else:
      parts.append("(" + ", ".join(repr(e) for e in entry) + ("," if len(entry) == 1 else "") + ")")
  return "P(" + ", ".join(parts) + ")"


def _leaf_bytes(leaf: Any) -> tuple[int, int]:
  """(total bytes, bytes on one device) of an array or ShapeDtypeStruct carrying a sharding."""
  itemsize = np.dtype(leaf.dtype).itemsize
  total = math.prod(leaf.shape) * itemsize
  sharding = getattr(leaf, "sharding", None)
  if sharding is None:
    return total, total
  return total, math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize


def _device_bytes(tree: Any) -> tuple[int, int]:
  """(total bytes, bytes on the most loaded device) over the array leaves of ``tree``."""
  per_device: dict[Any, int] = {}
  total = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      continue
    t, _ = _leaf_bytes(leaf)
    total += t
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
      per_device[None] = per_device.get(None, 0) + t
      continue
    for device, index in sharding.devices_indices_map(tuple(leaf.shape)).items():
      n = math.prod(len(range(*s.indices(d))) for s, d in zip(index, leaf.shape)) * np.dtype(leaf.dtype).itemsize
      per_device[device] = per_device.get(device, 0) + n
  return total, max(per_device.values(), default=0)


def sharding_report(params: Any, opt_state: Any = None) -> ShardingReport:
  """Build the report from trees of arrays or ShapeDtypeStructs that carry NamedShardings (e.g.
  ``trainer.abstract_params``/``trainer.abstract_opt_state``; nothing is allocated)."""
  rows = []
  mesh_shape: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    sharding = leaf.sharding
    if isinstance(sharding, NamedSharding):
      mesh_shape = dict(sharding.mesh.shape)
      spec = spec_str(sharding.spec)
    else:
      spec = str(sharding)
    total, per_device = _leaf_bytes(leaf)
    rows.append(ShardingRow(path=path_str(path), shape=tuple(int(d) for d in leaf.shape),
                            dtype=str(np.dtype(leaf.dtype)), spec=spec, bytes_total=total,
                            bytes_per_device=per_device))
  p_total, p_dev = _device_bytes(params)
  o_total, o_dev = _device_bytes(opt_state) if opt_state is not None else (0, 0)
  return ShardingReport(mesh_shape=mesh_shape, rows=tuple(rows), param_bytes_total=p_total,
                        param_bytes_per_device=p_dev, opt_bytes_total=o_total, opt_bytes_per_device=o_dev)


def format_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return f"{n:.2f} TiB"


def format_sharding_report(report: Any) -> str:
  """Text table of a ``ShardingReport`` (or of a ``Trainer``: its params and optimizer state)."""
  if not isinstance(report, ShardingReport):
    report = sharding_report(report.abstract_params, getattr(report, "abstract_opt_state", None))
  mesh = " x ".join(f"{k}={v}" for k, v in report.mesh_shape.items())
  width = max([len(r.path) for r in report.rows] + [9])
  spec_w = max([len(r.spec) for r in report.rows] + [4])
  lines = [f"resolved sharding on mesh {mesh}",
           f"{'parameter':<{width}}  {'shape':<24} {'spec':<{spec_w}}  {'per device':>11}"]
  for r in report.rows:
    lines.append(f"{r.path:<{width}}  {str(r.shape):<24} {r.spec:<{spec_w}}  {format_bytes(r.bytes_per_device):>11}")
  lines.append(f"params:          {format_bytes(report.param_bytes_total)} total, "
               f"{format_bytes(report.param_bytes_per_device)} per device")
  lines.append(f"optimizer state: {format_bytes(report.opt_bytes_total)} total, "
               f"{format_bytes(report.opt_bytes_per_device)} per device")
  return "\n".join(lines)
