"""Fault-tolerant resume: pick the newest checkpoint that actually restores, keep a good one through pruning.

* ``check_workdir`` (read-only, before anything is written): the newest checkpoint whose metadata is readable must
  come from the same model architecture and tokenizer, otherwise the run refuses to resume (``--fresh`` starts
  over); a checkpoint directory in which no step is readable at all is a clear error naming each step's path.
* ``restore_with_fallback``: restore the newest committed step; when it is corrupt (``CorruptCheckpointError``: an
  array's checksum differs from the one stored at save, array data cannot be decoded or is truncated, an item is
  missing, its metadata/data-state JSON is unreadable) warn with its path, move it aside into
  ``<workdir>/checkpoints.corrupt/`` (so the run can save that step number again) and try the previous one. When no
  step restores, stop with an error listing every step's path and failure. Any other failure (a storage error such
  as permission denied or an unreachable network filesystem, a target that does not fit) is not corruption: it
  stops the run with a clear error and moves nothing.
* ``prune_checkpoints``: keep-last-N done by the trainer rather than orbax: a step counts as good only once its
  arrays have been read back and match their stored checksums (``CheckpointManager.verify_arrays``), so the newest
  verified step is never deleted, whatever the newer steps look like; corrupt steps are moved aside.
* ``truncate_metrics``: on resume, drop metric rows written after the restored step (the killed run logged steps
  that the resumed run redoes), atomically (``paths.write_text``: a temporary file renamed over it on local disk,
  one object upload on an object store).

Every path goes through ``nanbeige_jax.paths``, so the workdir may be on any scheme (``gs://...``).

A step still being written (``<step>.orbax-checkpoint-tmp*``) is never listed by the checkpoint layer, so a process
killed mid-save leaves nothing a restart would pick up.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import jax

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.config import ConfigError

log = logging.getLogger("nanbeige_jax.resume")

CORRUPT_DIRNAME = "checkpoints.corrupt"


class ResumeError(ConfigError):
  """The workdir cannot be resumed (no readable checkpoint, or one from a different model/tokenizer)."""


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split())


def quarantine_step(manager: ckpt_lib.CheckpointManager, step: int, reason: str) -> paths.Path:
  """Move ``<ckpt_dir>/<step>`` to ``<ckpt_dir>/../checkpoints.corrupt/<step>.<unix time>`` (outside the directory
  orbax scans) and return the new path. The caller must reopen its CheckpointManager afterwards."""
  source = manager.step_dir(step)
  aside_root = manager.directory.parent / CORRUPT_DIRNAME
  target = aside_root / f"{step}.{int(time.time() * 1000)}"
  if jax.process_index() == 0:  # every process found the same failure; one moves it, the others wait
    paths.mkdir(aside_root)
    paths.rename(source, target)
    log.warning("checkpoint %s is unusable (%s); moved it aside to %s", source, reason, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"nanbeige_jax quarantine checkpoint step {step}")
  return target


def check_workdir(ckpt_dir: paths.PathLike, check_metadata: Callable[[int, dict], None]) -> int | None:
  """Read-only pre-flight check of an existing checkpoint directory (nothing is created or changed).

  Returns the newest step whose metadata is readable (None when there is no committed step). ``check_metadata
  (step, metadata)`` raises ConfigError when that checkpoint belongs to a different run (model, tokenizer).
  Raises ResumeError when steps exist but none has readable metadata.
  """
  if not paths.is_dir(ckpt_dir):
    return None
  with ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False, create=False) as manager:
    steps = manager.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        manager.verify_step(step)
        metadata = manager.read_metadata(step)
      except ckpt_lib.CorruptCheckpointError as e:
        failures.append(f"step {step} ({_one_line(e)})")
        continue
      except ckpt_lib.CheckpointError as e:
        raise ResumeError(f"cannot read checkpoint step {step} in {ckpt_dir}: {_one_line(e)}") from None
      check_metadata(step, metadata)
      return step
  if steps:
    raise ResumeError(f"no usable checkpoint in {ckpt_dir}: " + "; ".join(failures)
                      + "; move the directory away or pass --fresh to start over")
  return None


def restore_with_fallback(open_manager: Callable[[], ckpt_lib.CheckpointManager], *, params_target: Any,
                          opt_state_target: Any) -> tuple[ckpt_lib.CheckpointManager, ckpt_lib.Restored | None,
                                                          list[paths.Path]]:
  """Restore the newest step that restores completely; corrupt newer steps are moved aside (with a warning).

  ``open_manager()`` opens the run's CheckpointManager (called again after a step was moved aside, since orbax
  caches the step list). Returns ``(manager, restored or None when there is no step, moved-aside paths)``.
  Raises ResumeError, naming each step's path and error, when steps exist but none restores (nothing is moved
  then: the evidence stays where it is).
  """
  manager = open_manager()
  steps = manager.all_steps()
  failures: list[tuple[int, str]] = []
  for step in reversed(steps):
    try:
      restored = manager.restore(step, params_target=params_target, opt_state_target=opt_state_target)
      if restored.data_state is None or "iterator" not in restored.data_state:
        raise ckpt_lib.CorruptCheckpointError(f"{manager.step_dir(step)}: no data-iterator state (not a complete "
                                              f"training checkpoint of this project)")
    except ckpt_lib.CorruptCheckpointError as e:
      failures.append((step, _one_line(e)))
      continue
    except ckpt_lib.CheckpointError as e:  # storage error or a target that does not fit: not the step's fault
      manager.close()
      raise ResumeError(f"cannot restore checkpoint {manager.step_dir(step)}: {_one_line(e)}; nothing was moved "
                        f"aside") from None
    moved = []
    if failures:
      for bad_step, reason in failures:
        moved.append(quarantine_step(manager, bad_step, reason))
      log.warning("resuming from the previous good checkpoint %s (step %d)", manager.step_dir(step), step)
      manager.close()
      manager = open_manager()
    return manager, restored, moved
  if steps:
    manager.close()
    raise ResumeError(f"no checkpoint in {manager.directory} restores: "
                      + "; ".join(f"step {s}: {reason}" for s, reason in failures)
                      + "; move the directory away or pass --fresh to start over")
  return manager, None, []


def prune_checkpoints(manager: ckpt_lib.CheckpointManager, keep: int, *, params_target: Any = None,
                      opt_state_target: Any = None, verified: set[int] | None = None) -> list[int]:
  """Keep the ``keep`` newest verified steps; delete older ones; move corrupt ones aside. Returns the deleted steps.

  Newest first, a step is checked with ``verify_step`` and then ``verify_arrays`` (every array read back and
  compared with its stored checksum; targets as for ``restore``: pass the training shardings so that each process
  reads only its shards, None reads host copies). ``verified``: a set the caller keeps between calls; steps in it
  are not read again, steps verified now are added (so each save is read back once). A corrupt step is moved aside;
  any other error (storage unavailable) propagates and nothing is deleted. Steps older than the ``keep``-th verified
  one are deleted without being read. Call it when no save is in flight (``manager.wait_until_finished()`` first).
  """
  verified = set() if verified is None else verified
  good, deleted = [], []
  for step in reversed(manager.all_steps()):
    if len(good) >= keep:
      manager.delete(step)
      deleted.append(step)
      verified.discard(step)
      continue
    try:
      manager.verify_step(step)
      if step not in verified:
        manager.verify_arrays(step, params_target=params_target, opt_state_target=opt_state_target)
    except ckpt_lib.CorruptCheckpointError as e:
      verified.discard(step)
      quarantine_step(manager, step, _one_line(e))
      continue
    verified.add(step)
    good.append(step)
  return sorted(deleted)


def truncate_metrics(path: paths.PathLike, last_step: int) -> int:
  """Atomically drop rows with ``step > last_step`` (and unreadable partial lines) from a metrics JSONL file (any
  path-layer scheme). Returns the number of rows dropped."""
  if not paths.exists(path):
    return 0
  kept, dropped = [], 0
  for line in paths.read_text(path).splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, KeyError, TypeError):
      dropped += 1  # a line cut short by a kill
      continue
    if step > last_step:
      dropped += 1
    else:
      kept.append(line)
  if dropped:
    paths.write_text(path, "".join(line + "\n" for line in kept))
  return dropped
