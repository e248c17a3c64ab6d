"""The checkpoint layer of a run: the ``Checkpointer`` (save, resume with fallback, verified keep-last-N), the
stage hand-off (``init_params`` from a checkpoint of this project or a Hugging Face directory) and the metadata checks
(another stage's, model's or tokenizer's checkpoint is refused). The checkpoint-directory mechanics live in
``nanbeige_jax.train.resume``, the format in ``nanbeige_jax.checkpoint``.

``move_run_aside(workdir) -> [paths]``: ``--fresh`` renames ``checkpoints`` and ``metrics.jsonl`` aside.
``resolve_run_dirs(path) -> (checkpoint dir, run dir)``: a run workdir or its checkpoint directory.
``check_tokenizer(metadata, tokenizer, where)``: the one tokenizer-fingerprint check.
``check_checkpoint_metadata(workdir, step, meta, *, stage, model_cfg, tokenizer, accept_unstaged=False,
stage_description=None)``: ``resume.ResumeError`` when a checkpoint is not this run's.
``read_checkpoint_metadata(ckpt_dir, step=None) -> (metadata, step)``: read-only;
``model_config_from_metadata(metadata, where, overrides=None)``: the model config it was trained as.
``init_params(trainer, *, checkpoint_dir=None, step=None, hf_dir=None, role=None) -> (params, metadata)``: the
policy's initial parameters or (``role``) a frozen model's.
``Checkpointer(directory, *, metadata, data_state_fn, keep=3, async_save=True, check_metadata=None)``:
``latest_step()``, ``restore(trainer)``, ``save(step, state)``, ``last_saved``, ``step_path(step)``, ``close()``.
``resume_or_init(trainer, checkpointer, workdir, init_state) -> (state, start_step, data_state | None)``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.hf import load_hf_params
from nanbeige_jax.model import ModelConfig
from nanbeige_jax.train import resume
from nanbeige_jax.train.loop import METRICS_FILE
from nanbeige_jax.train.state import TrainState

log = logging.getLogger("nanbeige_jax.checkpointing")


class RunError(ValueError):
  """A run cannot start or resume as configured (wrong workdir contents, missing init checkpoint, ...)."""


# --- workdir and initial parameters ----------------------------------------------------------------------------
def move_run_aside(workdir: str | os.PathLike) -> list[paths.Path]:
  """``--fresh``: rename ``<workdir>/checkpoints`` and ``metrics.jsonl`` to ``<name>.old.<unix time>`` (nothing is
  deleted; on an object store a rename is a copy, then a delete). Call it only once the run's input is validated."""
  workdir = paths.as_path(workdir)
  moved = []
  if jax.process_index() != 0:
    return moved
  stamp = int(time.time())
  for path in (workdir / "checkpoints", workdir / METRICS_FILE):
    if path.exists():
      aside = path.with_name(f"{path.name}.old.{stamp}")
      paths.rename(path, aside)
      log.warning("--fresh: moved %s aside to %s", path, aside)
      moved.append(aside)
  return moved


def resolve_run_dirs(path: str | os.PathLike, *, what: str = "checkpoint directory"
                     ) -> tuple[paths.Path, paths.Path]:
  """``(checkpoint directory, run workdir)`` of ``path``, which names either a run workdir (holding
  ``checkpoints/``) or a checkpoint directory (``paths.resolve_run_dirs``); RunError when it does not exist."""
  try:
    return paths.resolve_run_dirs(path, what=what)
  except ValueError as e:
    raise RunError(str(e)) from None


def check_tokenizer(metadata: dict, tokenizer: Any, where: str) -> None:
  """RunError when checkpoint ``metadata`` records another tokenizer than ``tokenizer``."""
  reason = ckpt_lib.tokenizer_mismatch(metadata, tokenizer)
  if reason:
    raise RunError(f"{where} {reason}")


def read_checkpoint_metadata(ckpt_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, int]:
  """``(metadata, step)`` of checkpoint ``step`` (default: the latest) of ``ckpt_dir``, read-only."""
  try:
    with ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False, create=False) as manager:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise RunError(f"{ckpt_dir}: no committed checkpoint step")
      return manager.read_metadata(step), int(step)
  except ckpt_lib.CheckpointError as e:
    raise RunError(f"cannot read {ckpt_dir}: {e}") from None


def model_config_from_metadata(metadata: dict, where: str, overrides: dict | None = None) -> ModelConfig:
  """The ``ModelConfig`` a checkpoint was trained as, at its operative RoPE base
  (``checkpoint.model_config_from_metadata``), with compile-time ``overrides`` (dtype, remat, ...) applied."""
  try:
    cfg = ckpt_lib.model_config_from_metadata(metadata, where)
  except ckpt_lib.CheckpointError as e:
    raise RunError(str(e)) from None
  return cfg.replace(**overrides) if overrides else cfg


def check_checkpoint_metadata(workdir: str | os.PathLike, step: int, meta: dict, *, stage: str,
                              model_cfg: Any, tokenizer: Any | None, accept_unstaged: bool = False,
                              stage_description: str | None = None, rope_theta: float | None = None) -> None:
  """Raise ``resume.ResumeError`` when checkpoint ``step`` of ``workdir`` is not this run's: another stage, model
  architecture or tokenizer. ``accept_unstaged``: a checkpoint without a ``stage`` entry counts as this stage;
  ``stage_description`` names the stage in the message (default: ``repr(stage)``); ``rope_theta``: the RoPE base
  the checkpoint must have been trained at (default: ``model_cfg``'s)."""
  found = meta.get("stage")
  if found != stage and not (accept_unstaged and found is None):
    raise resume.ResumeError(f"{workdir}: checkpoint step {step} is a {found!r} checkpoint, not a "
                             f"{stage_description or repr(stage)} one (stage {found!r}, this run is stage "
                             f"{stage!r}); refusing to resume into it: use another --workdir or pass --fresh")
  try:
    if model_cfg is not None:
      ckpt_lib.check_model_config(meta, model_cfg, rope_theta=rope_theta)
  except ckpt_lib.CheckpointError as e:
    raise resume.ResumeError(f"{workdir} holds a checkpoint (step {step}) of a different model ({e}); refusing to "
                             f"resume into it: use another --workdir or pass --fresh to start over") from None
  if tokenizer is not None:
    try:
      check_tokenizer(meta, tokenizer, f"{workdir}: checkpoint step {step}")
    except RunError as e:
      raise resume.ResumeError(f"{e}; pass --fresh to start over") from None


def init_params(trainer: Any, *, checkpoint_dir: str | os.PathLike | None = None, step: int | None = None,
                hf_dir: str | os.PathLike | None = None, role: str | None = None) -> tuple[Any, dict]:
  """(params in their shardings, source metadata) from a checkpoint of this project or an HF dir: the policy's
  (``trainer.param_shardings``) or, with ``role``, the frozen model's (``trainer.frozen_shardings[role]``; e.g. a DPD
  reference or teacher), its architecture checked against the trainer's config for it."""
  if (checkpoint_dir is None) == (hf_dir is None):
    raise RunError("init_params: give exactly one of checkpoint_dir or hf_dir")
  if role is None:
    model_cfg, target, shardings = trainer.cfg, trainer.abstract_params, trainer.param_shardings
  elif role in trainer.frozen_configs:
    model_cfg, target = trainer.frozen_configs[role], trainer.abstract_frozen[role]
    shardings = trainer.frozen_shardings[role]
  else:
    raise RunError(f"init_params: no frozen model {role!r} in the trainer (roles {sorted(trainer.frozen_configs)})")
  if hf_dir is not None:
    cfg, params = load_hf_params(hf_dir, param_dtype=model_cfg.param_dtype)
    if cfg.fingerprint() != model_cfg.fingerprint():
      diffs = [f"{k}: hf {v!r} vs run {getattr(model_cfg, k)!r}" for k, v in cfg.arch_dict().items()
               if getattr(model_cfg, k) != v]
      raise RunError(f"{hf_dir}: the Hugging Face model differs from the run's model config: {'; '.join(diffs)}")
    return jax.device_put(params, shardings), {"stage": "hf", "source": str(hf_dir)}
  directory = paths.as_path(checkpoint_dir)
  if not directory.is_dir():
    raise RunError(f"init checkpoint directory {str(directory)!r} does not exist")
  try:
    with ckpt_lib.CheckpointManager(directory, max_to_keep=None, async_save=False, create=False) as manager:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise RunError(f"{directory}: no committed checkpoint step to initialise from")
      metadata = manager.read_metadata(step)
      ckpt_lib.check_model_config(metadata, model_cfg)
      restored = manager.restore(step, params_target=target, params_only=True)
  except ckpt_lib.CheckpointError as e:
    raise RunError(f"cannot initialise from {directory}: {e}") from None
  metadata = dict(metadata)
  metadata["source_step"] = int(step)
  return restored.params, metadata


# --- checkpoints -----------------------------------------------------------------------------------------------
@jax.jit
def _all_finite(params: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Checkpointer:
  """One run's checkpoints: full state + metadata + the data state, resumable exactly, with fallback and verified
  keep-last-N (``nanbeige_jax.train.resume``).

  ``metadata``: a dict, or ``metadata(step) -> dict`` (the stage records the RoPE base and phase the parameters were
  trained at, and the tokens seen, per save). ``targets``: ``(params, opt_state)`` abstract targets with the training
  shardings; keep-last-N then reads each new step's arrays back once and checks their checksums before counting it
  good (``resume.prune_checkpoints``). A state whose parameters are not all finite is never saved: the previous
  checkpoints stay the good ones."""

  def __init__(self, directory: str | os.PathLike, *, metadata: dict | Callable[[int], dict],
               data_state_fn: Callable[[], dict], keep: int = 3, async_save: bool = True,
               check_metadata: Callable[[int, dict], None] | None = None, targets: tuple[Any, Any] | None = None):
    self.directory = paths.as_path(directory)
    self.metadata = metadata
    self.data_state_fn = data_state_fn
    self.keep = keep
    self.check_metadata = check_metadata
    self._async_save = async_save
    self._targets = targets
    self._verified: set[int] = set()
    self.manager = self._open()
    self.last_saved: int | None = self.manager.latest_step()
    self.skipped_nonfinite: list[int] = []

  def _open(self) -> ckpt_lib.CheckpointManager:
    # max_to_keep=None: keep-last-N is done here (resume.prune_checkpoints) so the newest good step is never deleted.
    return ckpt_lib.CheckpointManager(self.directory, max_to_keep=None, async_save=self._async_save)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int | None) -> str:
    return str(self.directory / str(step)) if step is not None else "none written yet"

  def restore(self, trainer: Any) -> tuple[TrainState, int, dict] | None:
    """The newest step that restores completely (corrupt newer ones are moved aside), checked with
    ``check_metadata``; None when there is no step. The non-finite streak and skipped-step count come back too."""
    self.manager.close()
    self.manager, restored, _ = resume.restore_with_fallback(
        self._open, params_target=trainer.abstract_params, opt_state_target=trainer.abstract_opt_state)
    if restored is None:
      return None
    if self.check_metadata is not None:
      self.check_metadata(restored.step, restored.metadata)
    data_state = restored.data_state or {}
    state = trainer.state_from(restored.step, restored.params, restored.opt_state,
                               int(data_state.get("skipped_steps", 0)))
    state = state.replace(bad_streak=jax.device_put(np.int32(data_state.get("nonfinite_streak", 0)),
                                                    trainer.replicated))
    self.last_saved = int(restored.step)
    self._verified.add(int(restored.step))  # its arrays were just read and checked against their checksums
    return state, int(restored.step), data_state

  def _prune(self) -> None:
    params_target, opt_target = self._targets if self._targets is not None else (None, None)
    resume.prune_checkpoints(self.manager, self.keep, params_target=params_target, opt_state_target=opt_target,
                             verified=self._verified)

  def save(self, step: int, state: TrainState) -> bool:
    if self.last_saved == step:
      return False
    # The previous (async) save must be committed before it can be verified and older steps pruned; orbax's own
    # save would wait for it here anyway.
    self.manager.wait_until_finished()
    self._prune()
    if not bool(_all_finite(state.params)):
      self.skipped_nonfinite.append(step)
      log.error("not saving step %d: its parameters are not all finite (a corrupt restore or a divergence the "
                "non-finite skip did not catch); the last good checkpoint %s is kept", step,
                self.step_path(self.last_saved))
      return False
    data_state = dict(self.data_state_fn())
    data_state["skipped_steps"] = int(state.skipped_steps)
    data_state["nonfinite_streak"] = int(state.bad_streak)
    metadata = self.metadata(step) if callable(self.metadata) else self.metadata
    self.manager.save(step, params=state.params, opt_state=state.opt_state, metadata=metadata,
                      data_state=data_state)
    self.last_saved = step
    return True

  def close(self) -> None:
    self.manager.wait_until_finished()
    self._prune()
    self.manager.close()


def resume_or_init(trainer: Any, checkpointer: Checkpointer, workdir: str | os.PathLike,
                   init_state: Callable[[], TrainState]) -> tuple[TrainState, int, dict | None]:
  """``(state, start_step, data_state)``: restored from ``checkpointer`` (``data_state`` is what was saved), or
  ``init_state()`` at step 0 (``data_state`` None). On resume, metric rows logged after the restored step by the
  interrupted run are dropped from ``<workdir>/metrics.jsonl``."""
  restored = checkpointer.restore(trainer)
  if restored is None:
    return init_state(), 0, None
  state, start_step, data_state = restored
  log.info("resumed from %s step %d", checkpointer.directory, start_step)
  if jax.process_index() == 0:
    # Before the loop's MetricsWriter starts: on a non-local workdir it downloads metrics.jsonl to append to it.
    dropped = resume.truncate_metrics(paths.join(workdir, METRICS_FILE), start_step)
    if dropped:
      log.warning("dropped %d metric row(s) logged after step %d by the interrupted run", dropped, start_step)
  return state, start_step, data_state
