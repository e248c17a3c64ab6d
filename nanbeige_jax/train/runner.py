"""The generic outer training loop shared by trainers (SFT now; pre-training, DPD and RL can move onto it).

A trainer supplies *what* to train on; this module owns *how a run runs*: stop signals, checkpoint
save/resume/init-from-params, the non-finite policy, metric rows, progress and the eval hook. Nothing here knows
about a particular stage.

API
---
``StopSignal()``
    Context manager: SIGTERM/SIGINT set ``.requested`` (the signal name) instead of killing the process; the loop
    finishes its step, checkpoints and returns. ``preemption_point(step)`` is the multi-host equivalent
    (``jax.experimental.multihost_utils.reached_preemption_sync_point``; False on one process).

``move_checkpoints_aside(workdir) -> path | None``
    ``--fresh``: renames ``<workdir>/checkpoints`` to ``checkpoints.old.<time>`` (nothing is deleted).

``init_params(trainer, *, checkpoint_dir=None, step=None, hf_dir=None) -> (params, metadata)``
    Parameters for a new stage, placed in ``trainer.param_shardings``: a params-only read of any checkpoint of this
    project (the stage hand-off; architecture checked against ``trainer.cfg``) or a Hugging Face directory.
    ``metadata`` is the source checkpoint's (``{"stage": "hf", ...}`` for HF).

``Checkpointer(directory, *, metadata, data_state_fn, keep, async_save)``
    ``latest_step()``; ``check_resumable(model_cfg, tokenizer_fingerprint)`` (RunError when the directory holds a
    different model or tokenizer); ``restore(trainer) -> (TrainState, step, data_state)`` (full state: params,
    optimizer, counters); ``save(step, state)`` (params + opt_state + metadata + ``data_state_fn()``; a step saved
    already is skipped); ``last_saved``; ``close()`` (waits for async saves).

``StepInputs(batch, lr, rope_theta, tokens, seq_len, fields={}, boundary=False)``
    What the trainer hands the loop for one step: the host batch, the LR and RoPE base, the number of tokens the
    step processes (for throughput), its sequence length (MFU), extra metric fields to log (phase name, mixture
    weights, ...) and whether a checkpoint must follow the step (a phase boundary).

``LoopSettings(total_steps, log_every, eval_every, checkpoint_every, max_consecutive_nonfinite=5)``

``train_loop(trainer, state, *, start_step, settings, next_inputs, checkpointer, writer, progress,
             evaluate=None, log_fields=None, flops_per_token=None, peak_flops=None) -> LoopResult``
    Runs steps ``start_step .. total_steps - 1``: ``next_inputs(step) -> StepInputs``, ``trainer.train_step``;
    every ``log_every`` steps (and the first and the last) a metric row ``loss, lr, grad_norm, tokens_per_sec,
    steps_per_sec, skipped_steps, [mfu]`` plus ``inputs.fields`` plus ``log_fields(step, host_metrics, inputs)``
    goes to ``writer`` and the progress bar; every ``eval_every`` steps and at the end ``evaluate(step, state)``
    returns a row (written as is); checkpoints every ``checkpoint_every`` steps, after ``inputs.boundary`` steps,
    at the end, and on a stop signal. Non-finite steps are skipped by the train core; ``max_consecutive_nonfinite``
    of them in a row stop the run (``LoopResult.stop_reason``; the caller raises ``TrainingStopped``). The finite
    flag is read one step behind so the host never stalls the device pipeline.

``peak_flops_total() -> float | None``: all devices' peak FLOP/s (measured on CPU) for MFU.
``write_summary(workdir, summary)``: ``<workdir>/summary.json`` from process 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import time
from typing import Any, Callable

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.metrics import MetricsWriter, Progress, device_peak_flops, measure_cpu_peak_flops
from nanbeige_jax.train.state import TrainState

log = logging.getLogger("nanbeige_jax.runner")


class RunError(ValueError):
  """A run cannot start or resume as configured (wrong workdir contents, missing init checkpoint, ...)."""


class TrainingStopped(RuntimeError):
  """The run stopped on purpose with a clear reason (e.g. too many consecutive non-finite steps)."""


# --- signals ---------------------------------------------------------------------------------------------------
class StopSignal:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly (``.requested`` holds the signal name)."""

  def __init__(self):
    self.requested: str | None = None
    self._old: dict[int, Any] = {}

  def __enter__(self) -> "StopSignal":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with their owner
        pass
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc) -> bool:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old.clear()
    return False


def preemption_point(step: int) -> bool:
  if jax.process_count() == 1:
    return False
  try:
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # the preemption service is only set up by jax.distributed on some platforms
    return False


# --- workdir and initial parameters ----------------------------------------------------------------------------
def move_checkpoints_aside(workdir: str | os.PathLike) -> pathlib.Path | None:
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  if not ckpt_dir.exists() or jax.process_index() != 0:
    return None
  aside = pathlib.Path(workdir) / f"checkpoints.old.{int(time.time())}"
  os.replace(ckpt_dir, aside)
  log.warning("fresh start: moved the previous checkpoints aside to %s", aside)
  return aside


def init_params(trainer: Any, *, checkpoint_dir: str | os.PathLike | None = None, step: int | None = None,
                hf_dir: str | os.PathLike | None = None) -> tuple[Any, dict]:
  """(params in ``trainer.param_shardings``, source metadata) from a checkpoint of this project or an HF dir."""
  if (checkpoint_dir is None) == (hf_dir is None):
    raise RunError("init_params: give exactly one of checkpoint_dir or hf_dir")
  if hf_dir is not None:
    from nanbeige_jax.hf import load_hf_params
    cfg, params = load_hf_params(hf_dir, param_dtype=trainer.cfg.param_dtype)
    if cfg.fingerprint() != trainer.cfg.fingerprint():
      diffs = [f"{k}: hf {v!r} vs run {getattr(trainer.cfg, k)!r}" for k, v in cfg.arch_dict().items()
               if getattr(trainer.cfg, k) != v]
      raise RunError(f"{hf_dir}: the Hugging Face model differs from the run's model config: {'; '.join(diffs)}")
    return jax.device_put(params, trainer.param_shardings), {"stage": "hf", "source": str(hf_dir)}
  directory = pathlib.Path(checkpoint_dir)
  if not directory.is_dir():
    raise RunError(f"init checkpoint directory {str(directory)!r} does not exist")
  try:
    manager = ckpt_lib.CheckpointManager(directory, max_to_keep=None, async_save=False, create=False)
    try:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise RunError(f"{directory}: no committed checkpoint step to initialise from")
      metadata = manager.read_metadata(step)
      ckpt_lib.check_model_config(metadata, trainer.cfg)
      restored = manager.restore(step, params_target=trainer.abstract_params, params_only=True)
    finally:
      manager.close()
  except ckpt_lib.CheckpointError as e:
    raise RunError(f"cannot initialise from {directory}: {e}") from None
  metadata = dict(metadata)
  metadata["source_step"] = int(step)
  return restored.params, metadata


# --- checkpoints -----------------------------------------------------------------------------------------------
class Checkpointer:
  """One run's checkpoints: full state + metadata + the data state, resumable exactly."""

  def __init__(self, directory: str | os.PathLike, *, metadata: dict, data_state_fn: Callable[[], dict],
               keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory)
    self.metadata = metadata
    self.data_state_fn = data_state_fn
    self.manager = ckpt_lib.CheckpointManager(self.directory, max_to_keep=keep, async_save=async_save)
    self.last_saved: int | None = self.manager.latest_step()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_resumable(self, model_cfg: Any, tokenizer_fingerprint: str | None) -> None:
    latest = self.latest_step()
    if latest is None:
      return
    meta = self.manager.read_metadata(latest)
    try:
      ckpt_lib.check_model_config(meta, model_cfg)
    except ckpt_lib.CheckpointError as e:
      raise RunError(f"{self.directory} holds a checkpoint of a different model ({e}); refusing to resume into "
                     f"it: use another workdir or start fresh") from None
    stored = meta.get("tokenizer_fingerprint")
    if stored is not None and tokenizer_fingerprint is not None and stored != tokenizer_fingerprint:
      raise RunError(f"{self.directory}: checkpoint step {latest} was trained with tokenizer {stored}, but the "
                     f"configured tokenizer is {tokenizer_fingerprint}; start fresh to train with another one")
    if meta.get("stage") != self.metadata.get("stage"):
      raise RunError(f"{self.directory}: checkpoint step {latest} is from stage {meta.get('stage')!r}, this run is "
                     f"stage {self.metadata.get('stage')!r}; use another workdir or start fresh")

  def restore(self, trainer: Any) -> tuple[TrainState, int, dict]:
    step = self.latest_step()
    if step is None:
      raise RunError(f"{self.directory}: nothing to resume from")
    restored = self.manager.restore(step, params_target=trainer.abstract_params,
                                    opt_state_target=trainer.abstract_opt_state)
    data_state = restored.data_state or {}
    state = trainer.state_from(restored.step, restored.params, restored.opt_state,
                               int(data_state.get("skipped_steps", 0)))
    return state, int(restored.step), data_state

  def save(self, step: int, state: TrainState) -> bool:
    if self.last_saved == step:
      return False
    data_state = dict(self.data_state_fn())
    data_state["skipped_steps"] = int(state.skipped_steps)
    self.manager.save(step, params=state.params, opt_state=state.opt_state, metadata=self.metadata,
                      data_state=data_state)
    self.last_saved = step
    return True

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# --- the loop --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepInputs:
  batch: dict[str, np.ndarray]
  lr: float
  rope_theta: float
  tokens: int                       # tokens this step processes (throughput)
  seq_len: int                      # for MFU
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  boundary: bool = False            # checkpoint after this step (e.g. the end of a phase)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  max_consecutive_nonfinite: int = 5

  def __post_init__(self):
    for name in ("total_steps", "log_every", "eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoopSettings.{name}: expected a positive int, found {value!r}")
    if not isinstance(self.max_consecutive_nonfinite, int) or self.max_consecutive_nonfinite < 0:
      raise ValueError(f"LoopSettings.max_consecutive_nonfinite: expected an int >= 0, found "
                       f"{self.max_consecutive_nonfinite!r}")


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  step: int
  stop_reason: str | None
  first_loss: float | None
  last_loss: float | None
  last_eval: dict[str, Any] | None


def peak_flops_total() -> float | None:
  peak = device_peak_flops()
  if peak is None and jax.devices()[0].platform == "cpu":
    peak = measure_cpu_peak_flops()
  return peak * jax.device_count() if peak else None


def train_loop(trainer: Any, state: TrainState, *, start_step: int, settings: LoopSettings,
               next_inputs: Callable[[int], StepInputs], checkpointer: Checkpointer, writer: MetricsWriter,
               progress: Progress, evaluate: Callable[[int, TrainState], dict[str, Any]] | None = None,
               log_fields: Callable[[int, dict[str, Any], StepInputs], dict[str, Any]] | None = None,
               flops_per_token: Callable[[int], float] | None = None, peak_flops: float | None = None
               ) -> LoopResult:
  total = settings.total_steps
  first_loss = last_loss = None
  last_eval = None
  prev_metrics = None
  bad_streak = 0
  stop_reason = None
  t_last, tokens_since, step_last = time.perf_counter(), 0, start_step
  step = start_step
  with StopSignal() as stop:
    while step < total:
      inputs = next_inputs(step)
      state, metrics = trainer.train_step(state, inputs.batch, inputs.lr, inputs.rope_theta)
      step += 1
      tokens_since += inputs.tokens
      if prev_metrics is not None:
        bad_streak = 0 if bool(prev_metrics["finite"]) else bad_streak + 1
        limit = settings.max_consecutive_nonfinite
        if limit and bad_streak >= limit:
          stop_reason = (f"{bad_streak} consecutive non-finite steps (limit {limit}) ending at step {step - 1}; "
                         f"updates were skipped and the last good checkpoint (step {checkpointer.last_saved}) "
                         f"is intact")
          break
      prev_metrics = metrics
      if step % settings.log_every == 0 or step == total or step == start_step + 1:
        host = jax.device_get(metrics)
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        tok_s = tokens_since / dt
        loss = float(host["loss"])
        if first_loss is None and start_step == 0:
          first_loss = loss
        last_loss = loss
        row = {"loss": loss, "lr": inputs.lr, "grad_norm": float(host["grad_norm"]),
               "loss_tokens": float(host["tokens"]), "tokens_per_sec": tok_s,
               "steps_per_sec": (step - step_last) / dt, "seq_len": inputs.seq_len, "rope_theta": inputs.rope_theta,
               "skipped_steps": int(state.skipped_steps), **inputs.fields}
        if peak_flops and flops_per_token is not None:
          row["mfu"] = tok_s * flops_per_token(inputs.seq_len) / peak_flops
        if log_fields is not None:
          row.update(log_fields(step, host, inputs))
        writer.write(step, row)
        mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
        phase = f" | {inputs.fields['phase']}" if "phase" in inputs.fields else ""
        progress.update(step, f"loss {loss:.3f} | lr {inputs.lr:.2e}{phase} | {tok_s:,.0f} tok/s{mfu}")
        t_last, tokens_since, step_last = now, 0, step
      if evaluate is not None and (step % settings.eval_every == 0 or step == total):
        last_eval = evaluate(step, state)
        writer.write(step, last_eval)
      if step % settings.checkpoint_every == 0 or inputs.boundary or step == total:
        checkpointer.save(step, state)
      if stop.requested or preemption_point(step):
        stop_reason = f"preempted ({stop.requested or 'preemption sync point'}) at step {step}"
        checkpointer.save(step, state)
        break
  progress.close()
  return LoopResult(state=state, step=step, stop_reason=stop_reason, first_loss=first_loss, last_loss=last_loss,
                    last_eval=last_eval)


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "summary.json"
    tmp = path.with_suffix(f".json.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
