"""Checkpoints: the one save/restore layer for every trainer (pretrain, SFT, DPD, RL) and the HF converter.

Layout (orbax-checkpoint ``CheckpointManager``, one directory per step)::

  <directory>/
    <step>/                      # committed step; <step>.orbax-checkpoint-tmp while being written
      params/                    # orbax PyTree item: the model parameters (pure nested dict), OCDBT/zarr arrays
      opt_state/                 # orbax PyTree item: optimizer state (optional; absent in params-only checkpoints)
      data_state/metadata        # JSON: data-iterator state, e.g. grain's {"next_index": 12} (optional)
      metadata/metadata          # JSON: build_metadata(...) -> format_version, model_config (at the operative
                                 #       rope_theta), model_fingerprint, rope_theta, phase, stage,
                                 #       tokenizer_fingerprint, package versions, created_utc, extra
      checksums/metadata         # JSON: {"algorithm", "params": {key path: "dtype:hex"}, "opt_state": {...}}
      _CHECKPOINT_METADATA, commit_success.txt   # orbax bookkeeping

A step is written into ``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only once every item is on disk,
so a crash mid-save never leaves a directory that ``latest_step()`` reports; a stale tmp directory is replaced the
next time that step is saved. Arrays are stored with their global shape, so a checkpoint written on one mesh
restores onto any other mesh/sharding (or into host numpy arrays). Restore is strict: a target whose tree or
shapes differ from what is stored is an error naming the first mismatching key path (dtype casts are allowed);
``opt_state_target(tx, params_target)`` builds the optimizer-state target. Every failure to read a step raises
``CheckpointError`` naming the path; ``verify_step`` is the cheap completeness check.

Integrity: every array's checksum (``nanbeige_jax.checksums``: computed on the global value, the same on any mesh
and any process count) is stored at save and verified on every restore, in the stored dtype before any cast; a
mismatch, undecodable data, a missing item or unreadable JSON is ``CorruptCheckpointError``; a storage failure
(permission denied, network filesystem unavailable, timeout) is ``CheckpointReadError`` and says nothing about the
step. ``verify_arrays`` reads a step back without keeping it (keep-last-N counts a step only once it passed).
Checkpoints written before checksums existed restore with a warning that their arrays are unverified.
Metadata helpers (``build_metadata``, ``model_config_from_metadata``, ``check_model_config``) live in
``checkpoint_metadata``, tree helpers in ``checkpoint_trees``, the errors in ``checkpoint_errors``; all are
re-exported here.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from nanbeige_jax import checksums, paths
from nanbeige_jax.checkpoint_errors import (CheckpointError, CheckpointReadError, CorruptCheckpointError, is_transient,
                                            read_failure as _read_failure)
from nanbeige_jax.checkpoint_trees import (_check_tree_matches, _flat, _host_restore_args, _path_str,
                                           _prepare_for_save, _restore_args, _with_dtype, opt_state_target)
from nanbeige_jax.checkpoint_metadata import (FORMAT_VERSION, build_metadata, check_json as _check_json,
                                              check_model_config, model_config_from_metadata,
                                              tokenizer_mismatch, with_operative_rope)

__all__ = ["CheckpointError", "CorruptCheckpointError", "CheckpointReadError", "is_transient", "CheckpointManager",
           "Restored",
           "build_metadata", "check_model_config", "model_config_from_metadata", "tokenizer_mismatch",
           "with_operative_rope", "opt_state_target",
           "save_params_checkpoint", "load_params_checkpoint", "FORMAT_VERSION"]

log = logging.getLogger("nanbeige_jax.checkpoint")

ITEM_PARAMS = "params"
ITEM_OPT_STATE = "opt_state"
ITEM_DATA_STATE = "data_state"
ITEM_METADATA = "metadata"
ITEM_CHECKSUMS = "checksums"
JSON_FILENAME = "metadata"  # file name inside a JSON item directory
TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX




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
    self._directory = paths.orbax_directory(directory)  # a gs:// URI stays one; a local path is made absolute
    if not create and not self._directory.is_dir():
      raise CheckpointError(f"checkpoint directory {self._directory} does not exist (create=False)")
    preservation = (ocp.checkpoint_managers.LatestN(max_to_keep) if max_to_keep is not None
                    else ocp.checkpoint_managers.preservation_policy.PreserveAll())
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=async_save, preservation_policy=preservation,
        cleanup_tmp_directories=False)  # another process may be writing a tmp dir right now
    handlers = {ITEM_PARAMS: ocp.PyTreeCheckpointHandler(), ITEM_OPT_STATE: ocp.PyTreeCheckpointHandler(),
                ITEM_DATA_STATE: ocp.JsonCheckpointHandler(filename=JSON_FILENAME),
                ITEM_METADATA: ocp.JsonCheckpointHandler(filename=JSON_FILENAME),
                ITEM_CHECKSUMS: ocp.JsonCheckpointHandler(filename=JSON_FILENAME)}
    try:
      self._manager = ocp.CheckpointManager(self._directory, item_handlers=handlers, options=options)
    except Exception as e:
      raise CheckpointError(f"cannot open checkpoint directory {self._directory}: {type(e).__name__}: {e}") from e

  @property
  def directory(self) -> paths.Path:
    return self._directory

  def step_dir(self, step: int) -> paths.Path:
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
    params = _prepare_for_save(ITEM_PARAMS, params)
    sums = {"algorithm": checksums.ALGORITHM, ITEM_PARAMS: checksums.tree_checksums(_flat(params))}
    items = {ITEM_PARAMS: ocp.args.PyTreeSave(params), ITEM_METADATA: ocp.args.JsonSave(metadata)}
    if opt_state is not None:
      opt_state = _prepare_for_save(ITEM_OPT_STATE, opt_state)
      sums[ITEM_OPT_STATE] = checksums.tree_checksums(_flat(opt_state))
      items[ITEM_OPT_STATE] = ocp.args.PyTreeSave(opt_state)
    items[ITEM_CHECKSUMS] = ocp.args.JsonSave(sums)
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
      raise _read_failure(f"cannot read item metadata of {self.step_dir(step)}", e) from e
    return {name: composite.get(name) if hasattr(composite, "get") else getattr(composite, name, None)
            for name in (ITEM_PARAMS, ITEM_OPT_STATE)}

  def _stored_tree(self, step: int, item: str, item_metadata: dict[str, Any]) -> Any:
    tree_metadata = item_metadata.get(item)
    tree = getattr(tree_metadata, "tree", tree_metadata)
    if tree is None:
      raise CorruptCheckpointError(f"{self.step_dir(step) / item}: tree metadata is missing or unreadable")
    return tree

  def _read_json(self, step: int, item: str) -> dict:
    path = self.step_dir(step) / item / JSON_FILENAME
    try:
      value = json.loads(path.read_text())
    except FileNotFoundError as e:
      raise CorruptCheckpointError(f"{path}: missing") from e
    except OSError as e:
      raise _read_failure(f"{path}: unreadable", e) from e
    except ValueError as e:
      raise CorruptCheckpointError(f"{path}: unreadable JSON: {type(e).__name__}: {e}") from e
    if not isinstance(value, dict):
      raise CorruptCheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
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
    ``restore`` / ``verify_arrays``, which raise CorruptCheckpointError naming the path."""
    step = self._resolve_step(step)
    step_dir = self.step_dir(step)
    for item in (ITEM_PARAMS, ITEM_METADATA):
      if not (step_dir / item).is_dir():
        raise CorruptCheckpointError(f"{step_dir}: incomplete checkpoint, item {item!r} is missing")
    self.read_metadata(step)
    if (step_dir / ITEM_DATA_STATE).exists():
      self._read_json(step, ITEM_DATA_STATE)
    if (step_dir / ITEM_CHECKSUMS).exists():
      self._read_json(step, ITEM_CHECKSUMS)
    item_metadata = self._item_metadata(step)
    self._stored_tree(step, ITEM_PARAMS, item_metadata)
    if (step_dir / ITEM_OPT_STATE).exists():
      self._stored_tree(step, ITEM_OPT_STATE, item_metadata)

  # -- restore ---------------------------------------------------------------------------------------------------

  def _stored_checksums(self, step: int) -> dict | None:
    """The step's checksums item (None for a checkpoint written before checksums were stored)."""
    if not (self.step_dir(step) / ITEM_CHECKSUMS).exists():
      return None
    return self._read_json(step, ITEM_CHECKSUMS)

  def _restore_tree(self, step: int, item: str, target: Any, item_metadata: dict[str, Any],
                    stored_sums: dict | None) -> Any:
    """Read one array item in its stored dtypes, verify it against the stored checksums, then cast to the target's
    dtypes. A checksum mismatch or undecodable data is CorruptCheckpointError; a storage error CheckpointReadError."""
    stored = self._stored_tree(step, item, item_metadata)
    item_dir = self.step_dir(step) / item
    if target is None:
      args = ocp.args.PyTreeRestore(restore_args=_host_restore_args(stored))
      cast_to = None
    else:
      _check_tree_matches(item, item_dir, stored, target)
      stored_dtypes = {k: getattr(v, "dtype", None) for k, v in _flat(stored).items()}
      cast_to = jax.tree_util.tree_map_with_path(lambda p, x: np.dtype(x.dtype), target)
      read_target = jax.tree_util.tree_map_with_path(
          lambda p, x: _with_dtype(x, stored_dtypes.get(_path_str(p))), target)
      args = ocp.args.PyTreeRestore(item=read_target, restore_args=_restore_args(read_target))
    try:
      tree = self._manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:
      raise _read_failure(f"restoring {item_dir} failed", e) from e
    if stored_sums is None:
      log.warning("checkpoint %s has no stored checksums (written by an older version): its arrays are unverified",
                  item_dir)
    else:
      expected = stored_sums.get(item)
      if not isinstance(expected, dict):
        raise CorruptCheckpointError(f"{self.step_dir(step) / ITEM_CHECKSUMS}: no checksums for item {item!r}")
      as_dtypes = {k: checksums.stored_dtype(v) for k, v in expected.items() if isinstance(v, str)}
      bad = checksums.mismatches(expected, checksums.tree_checksums(_flat(tree), as_dtypes))
      if bad:
        raise CorruptCheckpointError(f"{item_dir}: array data is corrupt: checksum mismatch in {len(bad)} of "
                                     f"{len(expected)} arrays (first: {bad[0]!r})")
    if cast_to is not None:
      tree = jax.tree.map(lambda x, dtype: x if x.dtype == dtype else x.astype(dtype), tree, cast_to)
    return tree

  def verify_arrays(self, step: int, *, params_target=None, opt_state_target=None) -> None:
    """Read every array of a step and check it against the stored checksums (what keep-last-N counts as good):
    CorruptCheckpointError when the bytes are bad, CheckpointReadError when the storage failed. Targets as for
    ``restore`` (with the training shardings each process reads only its shards; None reads into host memory)."""
    self.restore(step, params_target=params_target, opt_state_target=opt_state_target)

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
    stored_sums = self._stored_checksums(step)
    params = self._restore_tree(step, ITEM_PARAMS, params_target, item_metadata, stored_sums)
    opt_state = data_state = None
    if not params_only:
      has_opt_state = (self.step_dir(step) / ITEM_OPT_STATE).exists()
      if has_opt_state:
        opt_state = self._restore_tree(step, ITEM_OPT_STATE, opt_state_target, item_metadata, stored_sums)
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
  with CheckpointManager(directory, max_to_keep=None, async_save=False, create=True) as manager:
    manager.save(step, params=params, metadata=metadata)


def load_params_checkpoint(directory, step: int | None = None, target=None) -> tuple[Any, dict]:
  """(params, metadata) of a step (None: latest) of any checkpoint, full or params-only."""
  with CheckpointManager(directory, max_to_keep=None, async_save=False, create=False) as manager:
    restored = manager.restore(step, params_target=target, params_only=True)
  return restored.params, restored.metadata
