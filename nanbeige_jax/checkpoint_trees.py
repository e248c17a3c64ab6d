"""Pytree helpers of the checkpoint layer: key paths, strict target matching, per-leaf orbax restore arguments,
leaf validation before a save, and the optimizer-state restore target (``opt_state_target``)."""
from __future__ import annotations

import pathlib
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nanbeige_jax.checkpoint_errors import CheckpointError
from nanbeige_jax.config import path_str



def _path_str(path: Iterable[Any]) -> str:
  return path_str(path, "<root>")


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Key path -> shape for every leaf; empty nodes (None, optax EmptyState) have no leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in flat}


def _check_tree_matches(item: str, item_dir: pathlib.Path, stored_tree: Any, target: Any) -> None:
  stored = _flat_shapes(stored_tree)
  wanted = _flat_shapes(target)
  for key in list(stored) + [k for k in wanted if k not in stored]:
    if key not in wanted:
      raise CheckpointError(f"{item_dir}: restore target for {item!r} does not match the checkpoint: first mismatch "
                            f"at {key!r}: stored with shape {stored[key]}, absent from the target")
    if key not in stored:
      raise CheckpointError(f"{item_dir}: restore target for {item!r} does not match the checkpoint: first mismatch "
                            f"at {key!r}: target expects shape {wanted[key]}, not found in the checkpoint")
    if stored[key] != wanted[key]:
      raise CheckpointError(f"{item_dir}: restore target for {item!r} does not match the checkpoint: first mismatch "
                            f"at {key!r}: target expects shape {wanted[key]}, checkpoint has {stored[key]}")


def _concrete_sharding(path: str, sharding: Any) -> Any:
  """Orbax cannot place arrays on an AbstractMesh (what ``nnx.eval_shape`` under ``jax.set_mesh`` produces); swap in
  the concrete mesh from ``jax.set_mesh`` when it has the same axes, else fail with the fix."""
  if not (isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, AbstractMesh)):
    return sharding
  mesh = jax.sharding.get_mesh()
  abstract = sharding.mesh
  if (isinstance(mesh, Mesh) and not mesh.empty and tuple(mesh.axis_names) == tuple(abstract.axis_names)
      and tuple(mesh.axis_sizes) == tuple(abstract.axis_sizes)):
    return NamedSharding(mesh, sharding.spec, memory_kind=sharding.memory_kind)
  raise CheckpointError(f"restore target at {path!r} has a NamedSharding on an AbstractMesh {dict(abstract.shape)} "
                        f"(from nnx.eval_shape under jax.set_mesh); restore inside `with jax.set_mesh(mesh):` with "
                        f"that concrete mesh, or rebuild the target as NamedSharding(mesh, x.sharding.spec)")


def _restore_args(target: Any) -> Any:
  """Per-leaf orbax RestoreArgs: a sharded leaf restores as a jax.Array placed on that sharding; a leaf without a
  sharding (numpy array or ShapeDtypeStruct with sharding=None) restores as a host numpy array."""
  def one(path, leaf):
    where = _path_str(path)
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
      sharding = getattr(leaf, "sharding", None)
      if sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(leaf.dtype))
      return ocp.ArrayRestoreArgs(sharding=_concrete_sharding(where, sharding), global_shape=tuple(leaf.shape),
                                  dtype=leaf.dtype, strict=True)
    if isinstance(leaf, (np.ndarray, np.generic)):
      return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
    raise CheckpointError(f"restore target leaf at {where!r} is a {type(leaf).__name__}; expected "
                          f"jax.ShapeDtypeStruct (with .sharding for a device array), jax.Array or np.ndarray")
  return jax.tree_util.tree_map_with_path(one, target)


def _flat(tree: Any) -> dict[str, Any]:
  """Key path -> leaf (the keys the checksums item is written with)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(path): leaf for path, leaf in flat}


def _with_dtype(leaf: Any, dtype: Any) -> Any:
  """``leaf`` as a restore target in the stored ``dtype`` (verification hashes the stored bytes)."""
  if dtype is None or np.dtype(leaf.dtype) == np.dtype(dtype):
    return leaf
  if isinstance(leaf, (np.ndarray, np.generic)):
    return np.zeros(leaf.shape, dtype)
  return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=getattr(leaf, "sharding", None))


def _host_restore_args(stored_tree: Any) -> Any:
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored_tree)


def _prepare_for_save(item: str, tree: Any) -> Any:
  """Validate leaves; in a multi-process run a host-local scalar jax.Array becomes numpy (orbax cannot serialise
  host-local jax.Arrays there) and a larger host-local array is an error."""
  multi_process = jax.process_count() > 1

  def one(path, leaf):
    if isinstance(leaf, jax.Array):
      if multi_process and leaf.is_fully_addressable:
        if leaf.ndim == 0:
          return np.asarray(leaf)
        raise CheckpointError(f"{item}/{_path_str(path)}: host-local jax.Array of shape {leaf.shape} in a "
                              f"{jax.process_count()}-process run; place it on a global mesh "
                              f"(jax.device_put(x, NamedSharding(mesh, spec))) before saving")
      return leaf
    if isinstance(leaf, (np.ndarray, np.generic, int, float, bool)):
      return leaf
    raise CheckpointError(f"{item}/{_path_str(path)}: cannot save a leaf of type {type(leaf).__name__}; expected "
                          f"jax.Array or numpy (pass pure dicts, e.g. nnx.to_pure_dict(nnx.state(model, nnx.Param)))")

  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise CheckpointError(f"{item}: nothing to save (the tree has no array leaves)")
  return jax.tree_util.tree_map_with_path(one, tree)


def opt_state_target(tx: Any, params_target: Any) -> Any:
  """Restore target for an optax state: ``jax.eval_shape(tx.init, params)`` with each parameter-shaped subtree
  (adam mu/nu, ...) taking the shardings of ``params_target`` and every other leaf (step counts) replicated on the
  params' mesh (globally sharded, as multi-process restores need); host numpy when params_target has no shardings."""
  abstract = jax.eval_shape(tx.init, params_target)
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(params_target)]
  named = [s for s in shardings if isinstance(s, NamedSharding)]
  replicated = NamedSharding(named[0].mesh, PartitionSpec()) if named else None

  def param_leaf(state_leaf, param_leaf):
    return jax.ShapeDtypeStruct(state_leaf.shape, state_leaf.dtype, sharding=getattr(param_leaf, "sharding", None))

  def other_leaf(state_leaf):
    return jax.ShapeDtypeStruct(state_leaf.shape, state_leaf.dtype, sharding=replicated)

  import optax
  return optax.tree_map_params(tx, param_leaf, abstract, params_target,
                               transform_non_params=lambda x: jax.tree.map(other_leaf, x))
