"""Checkpoints: the one save/restore layer for every trainer (pretrain, SFT, DPD, RL) and the HF converter.

Layout (orbax-checkpoint ``CheckpointManager``, one directory per step)::

  <directory>/
    <step>/                      # committed step; <step>.orbax-checkpoint-tmp while being written
      params/                    # orbax PyTree item: the model parameters (pure nested dict), OCDBT/zarr arrays
      opt_state/                 # orbax PyTree item: optimizer state (optional; absent in params-only checkpoints)
      data_state/metadata        # JSON: data-iterator state, e.g. grain's {"next_index": 12} (optional)
      metadata/metadata          # JSON: build_metadata(...) -> format_version, model_config, model_fingerprint,
                                 #       stage, tokenizer_fingerprint, package versions, created_utc, extra
      _CHECKPOINT_METADATA, commit_success.txt   # orbax bookkeeping

A step is written into ``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only once every item is on disk,
so a crash mid-save never leaves a directory that ``latest_step()`` reports; a stale tmp directory is replaced the
next time that step is saved. Arrays are stored with their global shape, so a checkpoint written on one mesh
restores onto any other mesh/sharding (or into host numpy arrays). Restore is strict: a target whose tree or
shapes differ from what is stored is an error naming the first mismatching key path (dtype casts are allowed);
``opt_state_target(tx, params_target)`` builds the optimizer-state target. Every failure to read a step raises
``CheckpointError`` naming the path; ``verify_step`` is the cheap completeness check.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import pathlib
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nanbeige_jax.config import path_str

FORMAT_VERSION = 1
ITEM_PARAMS = "params"
ITEM_OPT_STATE = "opt_state"
ITEM_DATA_STATE = "data_state"
ITEM_METADATA = "metadata"
JSON_FILENAME = "metadata"  # file name inside a JSON item directory
TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX
_VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt, or does not match what the caller asked for."""


# ----------------------------------------------------------------------------------------------------------------
# Metadata


def _package_versions() -> dict[str, str | None]:
  import nanbeige_jax
  versions: dict[str, str | None] = {}
  for name in _VERSIONED_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  versions["nanbeige_jax"] = nanbeige_jax.__version__
  return versions


def build_metadata(model_cfg, *, stage: str, tokenizer_fingerprint: str | None = None,
                   extra: dict | None = None) -> dict:
  """The JSON metadata stored with every checkpoint (``model_cfg`` is a ``ModelConfig``)."""
  if not isinstance(stage, str) or not stage:
    raise ValueError(f"build_metadata: stage must be a non-empty string, found {stage!r}")
  if tokenizer_fingerprint is not None and not isinstance(tokenizer_fingerprint, str):
    raise ValueError(f"build_metadata: tokenizer_fingerprint must be a string or None, "
                     f"found {type(tokenizer_fingerprint).__name__}")
  metadata = {
      "format_version": FORMAT_VERSION,
      "model_config": model_cfg.to_dict(),
      "model_fingerprint": model_cfg.fingerprint(),
      "stage": stage,
      "tokenizer_fingerprint": tokenizer_fingerprint,
      "versions": _package_versions(),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "extra": dict(extra or {}),
  }
  _check_json("metadata", metadata)
  return metadata


def tokenizer_mismatch(metadata: dict, tokenizer: Any) -> str | None:
  """None when ``tokenizer`` can be the one the checkpoint was trained with (same fingerprint, or none recorded);
  else the one-line reason (each caller raises its own error with its context)."""
  stored = metadata.get("tokenizer_fingerprint")
  if stored is None or stored == tokenizer.fingerprint():
    return None
  return (f"was trained with tokenizer fingerprint {stored}, but the configured tokenizer "
          f"{getattr(tokenizer, 'source', '')!r} has fingerprint {tokenizer.fingerprint()}")


def check_model_config(metadata: dict, model_cfg) -> None:
  """Raise CheckpointError unless the checkpoint's architecture matches ``model_cfg`` (compile-time knobs such as
  scan_layers, remat_policy, dtype are free to differ); the message lists the differing fields."""
  stored = metadata.get("model_fingerprint")
  if stored == model_cfg.fingerprint():
    return
  stored_cfg = metadata.get("model_config") or {}
  diffs = [f"{k}: checkpoint {stored_cfg.get(k)!r} vs config {v!r}" for k, v in model_cfg.arch_dict().items()
           if stored_cfg.get(k) != v]
  raise CheckpointError(f"checkpoint model_fingerprint {stored!r} does not match the config's "
                        f"{model_cfg.fingerprint()!r}: " + ("; ".join(diffs) or "model_config missing"))


def _check_json(what: str, value: Any) -> None:
  """JSON items must be dicts with string keys that json can serialise (int keys would silently become str;
  tuples come back as lists)."""
  if not isinstance(value, dict):
    raise ValueError(f"{what} must be a dict, found {type(value).__name__}")

  def walk(node: Any, path: str) -> None:
    if isinstance(node, dict):
      for key, child in node.items():
        if not isinstance(key, str):
          raise ValueError(f"{what}: key {key!r} at {path or '<root>'} is {type(key).__name__}; JSON keys must be str")
        walk(child, f"{path}/{key}")
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        walk(child, f"{path}/{i}")
    elif not (node is None or isinstance(node, (str, bool, int, float))):
      raise ValueError(f"{what}: value at {path or '<root>'} has type {type(node).__name__}, which is not JSON "
                       f"(use str/int/float/bool/None/list/dict)")
  walk(value, "")
  json.dumps(value, allow_nan=True)


# ----------------------------------------------------------------------------------------------------------------
# Tree helpers


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


# ----------------------------------------------------------------------------------------------------------------
# Manager


@dataclasses.dataclass
class Restored:
  step: int
  params: Any
  opt_state: Any | None
  data_state: dict | None
  metadata: dict


class CheckpointManager:
  """Save/restore ``<directory>/<step>/{params,opt_state,data_state,metadata}``; see the module docstring."""

  def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True, create: bool = True):
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or isinstance(max_to_keep, bool)
                                    or max_to_keep < 1):
      raise ValueError(f"CheckpointManager.max_to_keep: expected a positive int or None, found {max_to_keep!r}")
    self._directory = pathlib.Path(directory).expanduser().absolute()
    if not create and not self._directory.is_dir():
      raise CheckpointError(f"checkpoint directory {self._directory} does not exist (create=False)")
    preservation = (ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep is not None
                    else ocp.checkpoint_managers.preservation_policy.PreserveAll())
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=async_save, preservation_policy=preservation,
        cleanup_tmp_directories=False)  # another process may be writing a tmp dir right now
    handlers = {ITEM_PARAMS: ocp.PyTreeCheckpointHandler(), ITEM_OPT_STATE: ocp.PyTreeCheckpointHandler(),
                ITEM_DATA_STATE: ocp.JsonCheckpointHandler(filename=JSON_FILENAME),
                ITEM_METADATA: ocp.JsonCheckpointHandler(filename=JSON_FILENAME)}
    try:
      self._manager = ocp.CheckpointManager(self._directory, item_handlers=handlers, options=options)
    except Exception as e:
      raise CheckpointError(f"cannot open checkpoint directory {self._directory}: {type(e).__name__}: {e}") from e

  @property
  def directory(self) -> pathlib.Path:
    return self._directory

  def step_dir(self, step: int) -> pathlib.Path:
    return self._directory / str(step)

  # -- listing ---------------------------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps on disk, ascending (a step still being written, or left half-written, is not listed)."""
    return sorted(ocp.path.step.checkpoint_steps(self._directory))

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- save ------------------------------------------------------------------------------------------------------

  def save(self, step: int, *, params, metadata: dict, opt_state=None, data_state: dict | None = None) -> None:
    """Write a step. With async_save this returns once arrays are copied to host (the caller may donate/delete
    them) and the files are written in the background; ``wait_until_finished`` blocks until committed."""
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
      raise ValueError(f"CheckpointManager.save: step must be a non-negative int, found {step!r}")
    step = int(step)
    _check_json("metadata", metadata)
    if data_state is not None:
      _check_json("data_state", data_state)
    known = set(self.all_steps()) | set(self._manager.all_steps())
    if step in known:
      raise CheckpointError(f"checkpoint step {step} already exists at {self.step_dir(step)}")
    if known and step < max(known):
      raise CheckpointError(f"cannot save step {step} into {self._directory}: a later step {max(known)} exists "
                            f"(delete it first with CheckpointManager.delete)")
    items = {ITEM_PARAMS: ocp.args.PyTreeSave(_prepare_for_save(ITEM_PARAMS, params)),
             ITEM_METADATA: ocp.args.JsonSave(metadata)}
    if opt_state is not None:
      items[ITEM_OPT_STATE] = ocp.args.PyTreeSave(_prepare_for_save(ITEM_OPT_STATE, opt_state))
    if data_state is not None:
      items[ITEM_DATA_STATE] = ocp.args.JsonSave(data_state)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      raise CheckpointError(f"saving step {step} to {self.step_dir(step)} failed: {type(e).__name__}: {e}") from e
    if not saved:
      raise CheckpointError(f"orbax declined to save step {step} to {self.step_dir(step)}")

  def wait_until_finished(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f"background save into {self._directory} failed: {type(e).__name__}: {e}") from e

  def delete(self, step: int) -> None:
    """Remove one step (e.g. a corrupt one before training past it again)."""
    self.wait_until_finished()
    if step not in self.all_steps():
      raise CheckpointError(f"no committed checkpoint step {step} in {self._directory}; steps: {self.all_steps()}")
    self._manager.reload()  # the step may have been written by another manager since this one was opened
    self._manager.delete(step)

  def close(self) -> None:
    self.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- inspection ------------------------------------------------------------------------------------------------

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise CheckpointError(f"no committed checkpoint in {self._directory}")
      return steps[-1]
    if step not in steps:
      where = self.step_dir(step)
      state = "is uncommitted (a save was interrupted or is in progress)" if any(
          self._directory.glob(f"{step}{TMP_SUFFIX}*")) else "does not exist"
      raise CheckpointError(f"checkpoint step {step} at {where} {state}; committed steps: {steps}")
    return int(step)

  def _item_metadata(self, step: int) -> dict[str, Any]:
    try:
      composite = self._manager.item_metadata(step)
    except Exception as e:
      raise CheckpointError(f"cannot read item metadata of {self.step_dir(step)}: {type(e).__name__}: {e}") from e
    return {name: composite.get(name) if hasattr(composite, "get") else getattr(composite, name, None)
            for name in (ITEM_PARAMS, ITEM_OPT_STATE)}

  def _stored_tree(self, step: int, item: str, item_metadata: dict[str, Any]) -> Any:
    tree_metadata = item_metadata.get(item)
    tree = getattr(tree_metadata, "tree", tree_metadata)
    if tree is None:
      raise CheckpointError(f"{self.step_dir(step) / item}: tree metadata is missing or unreadable")
    return tree

  def _read_json(self, step: int, item: str) -> dict:
    path = self.step_dir(step) / item / JSON_FILENAME
    try:
      value = json.loads(path.read_text())
    except FileNotFoundError as e:
      raise CheckpointError(f"{path}: missing") from e
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: unreadable JSON: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
      raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value

  def read_metadata(self, step: int | None = None) -> dict:
    step = self._resolve_step(step)
    metadata = self._read_json(step, ITEM_METADATA)
    version = metadata.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
      raise CheckpointError(f"{self.step_dir(step) / ITEM_METADATA}: format_version {version} is newer than this "
                            f"code's {FORMAT_VERSION}")
    return metadata

  def verify_step(self, step: int) -> None:
    """Cheap integrity check (no array data is read): the step is committed, ``params`` and ``metadata`` exist,
    the JSON items parse and the array items' tree metadata is readable. Corrupt array data is caught by
    ``restore``, which raises CheckpointError naming the path."""
    step = self._resolve_step(step)
    step_dir = self.step_dir(step)
    for item in (ITEM_PARAMS, ITEM_METADATA):
      if not (step_dir / item).is_dir():
        raise CheckpointError(f"{step_dir}: incomplete checkpoint, item {item!r} is missing")
    self.read_metadata(step)
    if (step_dir / ITEM_DATA_STATE).exists():
      self._read_json(step, ITEM_DATA_STATE)
    item_metadata = self._item_metadata(step)
    self._stored_tree(step, ITEM_PARAMS, item_metadata)
    if (step_dir / ITEM_OPT_STATE).exists():
      self._stored_tree(step, ITEM_OPT_STATE, item_metadata)

  # -- restore ---------------------------------------------------------------------------------------------------

  def _restore_tree(self, step: int, item: str, target: Any, item_metadata: dict[str, Any]) -> Any:
    stored = self._stored_tree(step, item, item_metadata)
    item_dir = self.step_dir(step) / item
    if target is None:
      args = ocp.args.PyTreeRestore(restore_args=_host_restore_args(stored))
    else:
      _check_tree_matches(item, item_dir, stored, target)
      args = ocp.args.PyTreeRestore(item=target, restore_args=_restore_args(target))
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:
      raise CheckpointError(f"restoring {item_dir} failed: {type(e).__name__}: {e}") from e

  def restore(self, step: int | None = None, *, params_target=None, opt_state_target=None,
              params_only: bool = False) -> Restored:
    """Restore a step (None: the latest committed one). Targets: pytrees of jax.ShapeDtypeStruct whose .sharding
    (any mesh) places the restored jax.Arrays; None restores host numpy arrays in the stored structure (dicts and
    lists; optax namedtuples come back only with a target). ``params_only`` reads params + metadata."""
    self.wait_until_finished()
    step = self._resolve_step(step)
    self.verify_step(step)
    metadata = self.read_metadata(step)
    item_metadata = self._item_metadata(step)
    params = self._restore_tree(step, ITEM_PARAMS, params_target, item_metadata)
    opt_state = data_state = None
    if not params_only:
      has_opt_state = (self.step_dir(step) / ITEM_OPT_STATE).exists()
      if has_opt_state:
        opt_state = self._restore_tree(step, ITEM_OPT_STATE, opt_state_target, item_metadata)
      elif opt_state_target is not None:
        raise CheckpointError(f"{self.step_dir(step)} has no opt_state (a params-only checkpoint); restore with "
                              f"params_only=True or without opt_state_target")
      if (self.step_dir(step) / ITEM_DATA_STATE).exists():
        data_state = self._read_json(step, ITEM_DATA_STATE)
    return Restored(step=step, params=params, opt_state=opt_state, data_state=data_state, metadata=metadata)


# ----------------------------------------------------------------------------------------------------------------
# One-shot helpers


def save_params_checkpoint(directory, params, metadata: dict, step: int = 0) -> None:
  """Synchronously write a params-only checkpoint (``<directory>/<step>/{params,metadata}``)."""
  manager = CheckpointManager(directory, max_to_keep=None, async_save=False, create=True)
  try:
    manager.save(step, params=params, metadata=metadata)
  finally:
    manager.close()


def load_params_checkpoint(directory, step: int | None = None, target=None) -> tuple[Any, dict]:
  """(params, metadata) of a step (None: latest) of any checkpoint, full or params-only."""
  manager = CheckpointManager(directory, max_to_keep=None, async_save=False, create=False)
  try:
    restored = manager.restore(step, params_target=target, params_only=True)
  finally:
    manager.close()
  return restored.params, restored.metadata
