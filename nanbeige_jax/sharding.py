"""Logical axis names -> mesh axes.

Model code names every parameter and main activation dimension with a *logical* axis ("embed", "heads", ...).
A rules table (from config) maps each logical name to a mesh axis (or a tuple of mesh axes, or None for
replicated). This module resolves those names into ``PartitionSpec``/``NamedSharding`` and applies activation
constraints while a ``use_mesh_rules`` context is active; outside such a context constraints are no-ops, so the
model runs unchanged on one device.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
  if num_slices > 1:
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  else:
    try:
      arr = mesh_utils.create_device_mesh(ici, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.array(devices).reshape(ici)
  return Mesh(arr, MESH_AXES)
