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


def logical_to_spec(axes: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec. Unknown names are an error; a mesh axis is used at most once
  per array (a later dimension that maps to an already-used mesh axis is left replicated), and mesh axes of
  size 1 are dropped so specs stay readable."""
  table = dict(rules)
  used: set[str] = set()
  out: list[MeshAxes] = []
  for name in axes:
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
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules, mesh)))


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


def tree_shardings(axes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
  """Pure tree of logical-axis tuples -> tree of NamedShardings."""
  return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes, rules, mesh)), axes_tree,
                      is_leaf=lambda x: isinstance(x, tuple))


def single_device_mesh() -> Mesh:
  import numpy as np
  return Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
