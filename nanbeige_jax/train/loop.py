"""The outer training loop every trainer uses: stop signals, stepping, logging, the eval and checkpoint cadence and
the non-finite policy. Nothing here knows a particular stage; the jitted step is ``nanbeige_jax.train.step``, the
checkpoint layer ``nanbeige_jax.train.checkpointing``, the set-up sequence ``nanbeige_jax.train.stage``.

``StopSignal()``: context manager; SIGTERM/SIGINT set ``.requested`` (the signal name) instead of killing the
process: the loop finishes its step, checkpoints and returns (or returns before the first step when the signal came
during set-up). A second signal kills the process at once. ``preemption_point(step)`` is the multi-host equivalent.

``StepInputs(batch, lr, rope_theta, tokens, seq_len, fields={}, boundary=False, frozen=None)``: one step's host batch,
LR and RoPE base, tokens processed (throughput), sequence length (MFU), extra metric fields, whether a checkpoint must
follow (a phase boundary) and the frozen models' parameters ``{role: params}`` when the objective reads any.

``train_loop(trainer, state, *, start_step, settings, next_inputs, checkpointer, writer, progress, evaluate=None,
log_fields=None, flops_per_token=None, peak_flops=None, stop=None) -> LoopResult``: runs steps ``start_step ..
total_steps - 1``. ``next_inputs(step, state) -> StepInputs`` sees the current state (a rollout stage samples with the
current parameters; copy them, the step donates the state). Every ``log_every`` steps (and the first and last) a
metric row: ``loss`` (the objective's logged term, e.g. the LM cross-entropy without z-loss), ``objective`` (the
minimised total), ``objective/<term>`` for every term (e.g. ``objective/ce``, ``objective/z``), ``lr``,
``grad_norm``, ``tokens_per_sec``, ``steps_per_sec``, ``skipped_steps``, ``[mfu]``, the inputs' fields and
``log_fields(step, host_metrics, inputs)``. ``evaluate(step, state)`` every ``eval_every`` steps and at the end;
checkpoints every ``checkpoint_every`` steps, after boundary steps, at the end and on a stop signal.
``max_consecutive_nonfinite`` skipped steps in a row stop the run.
``run_loop(cfg, trainer, state, *, workdir, ...)``: ``train_loop`` with a config's cadence, metrics to the workdir.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from nanbeige_jax.metrics import MetricsWriter, Progress, device_peak_flops, measure_cpu_peak_flops
from nanbeige_jax.train.state import TrainState


if TYPE_CHECKING:  # annotations only (checkpointing imports this module)
  from nanbeige_jax.train.checkpointing import Checkpointer

log = logging.getLogger("nanbeige_jax.loop")

METRICS_FILE = "metrics.jsonl"  # what MetricsWriter writes in the workdir


class TrainingStopped(RuntimeError):
  """The run stopped on purpose with a clear reason (e.g. too many consecutive non-finite steps)."""


# --- signals ---------------------------------------------------------------------------------------------------
class StopSignal:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly (``.requested`` holds the signal name).

  A second signal ends the process at once (the signal's default action), e.g. when an operator does not want to
  wait for the checkpoint. Enter it before set-up so that a signal during set-up or compilation is honoured too.
  """

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
    if self.requested is not None:
      self._restore()
      signal.raise_signal(signum)
      return
    self.requested = signal.Signals(signum).name
    log.warning("%s received: finishing the current step, then checkpointing and exiting", self.requested)

  def _restore(self) -> None:
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}

  def __exit__(self, *exc) -> bool:
    self._restore()
    return False


def preemption_point(step: int) -> bool:
  if jax.process_count() == 1:
    return False
  try:
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # the preemption service is only set up by jax.distributed on some platforms
    return False


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
  frozen: dict[str, Any] | None = None  # {role: params} of the frozen models the objective reads


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
               next_inputs: Callable[[int, TrainState], StepInputs], checkpointer: Checkpointer, writer: MetricsWriter,
               progress: Progress, evaluate: Callable[[int, TrainState], dict[str, Any]] | None = None,
               log_fields: Callable[[int, dict[str, Any], StepInputs], dict[str, Any]] | None = None,
               flops_per_token: Callable[[int], float] | None = None, peak_flops: float | None = None,
               stop: StopSignal | None = None) -> LoopResult:
  if stop is None:
    with StopSignal() as own_stop:
      return train_loop(trainer, state, start_step=start_step, settings=settings, next_inputs=next_inputs,
                        checkpointer=checkpointer, writer=writer, progress=progress, evaluate=evaluate,
                        log_fields=log_fields, flops_per_token=flops_per_token, peak_flops=peak_flops,
                        stop=own_stop)
  total = settings.total_steps
  limit = settings.max_consecutive_nonfinite
  first_loss = last_loss = None
  last_eval = None
  prev_metrics = None
  bad_streak = int(state.bad_streak)  # restored with the checkpoint: a resumed run counts like an uninterrupted one
  stop_reason = None
  t_last, tokens_since, step_last = time.perf_counter(), 0, start_step

  finite_since_start = False  # a finite step since this process started (or restored)

  def nonfinite_check(metrics: Any, step_of_metrics: int) -> str | None:
    nonlocal bad_streak, finite_since_start
    finite = bool(metrics["finite"])
    finite_since_start = finite_since_start or finite
    bad_streak = 0 if finite else bad_streak + 1
    if limit and bad_streak >= limit:
      reason = (f"{bad_streak} consecutive non-finite steps (limit {limit}) ending at step {step_of_metrics}; their "
                f"updates were skipped and the last good checkpoint "
                f"({checkpointer.step_path(checkpointer.last_saved)}) is intact")
      if start_step > 0 and not finite_since_start:
        reason += (f"; every step since the restore of {checkpointer.step_path(start_step)} was non-finite, so that "
                   f"checkpoint is likely corrupt (parameters or optimizer state): move it aside (e.g. into "
                   f"checkpoints.corrupt/) and rerun to resume from the previous one")
      return reason
    return None

  step = start_step
  while step < total:
    if stop.requested:  # arrived during set-up or compilation: nothing trained since the last checkpoint
      stop_reason = f"preempted ({stop.requested}) at step {step}"
      break
    inputs = next_inputs(step, state)
    state, metrics = trainer.train_step(state, inputs.batch, inputs.lr, inputs.rope_theta, inputs.frozen)
    step += 1
    tokens_since += inputs.tokens
    # Non-finite policy, read one step behind so the host never stalls the device pipeline.
    if prev_metrics is not None:
      stop_reason = nonfinite_check(prev_metrics, step - 1)
      if stop_reason:
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
      row = {"loss": loss, "objective": float(host["objective"]),
             **{f"objective/{t}": float(v) for t, v in host["terms"].items()}, "lr": inputs.lr,
             "grad_norm": float(host["grad_norm"]), "loss_tokens": float(host["tokens"]), "tokens_per_sec": tok_s,
             "steps_per_sec": (step - step_last) / dt, "seq_len": inputs.seq_len, "rope_theta": inputs.rope_theta,
             "skipped_steps": int(state.skipped_steps), **inputs.fields}
      if peak_flops and flops_per_token is not None:
        row["mfu"] = tok_s * flops_per_token(inputs.seq_len) / peak_flops
      if log_fields is not None:
        row.update(log_fields(step, host, inputs))
      writer.write(step, row)
      mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
      phase = f" | {inputs.fields['phase']}" if "phase" in inputs.fields else ""
      seen = f" | {inputs.fields['tokens_seen'] / 1e6:.2f}M tok" if "tokens_seen" in inputs.fields else ""
      progress.update(step, f"loss {loss:.3f} | lr {inputs.lr:.2e}{phase}{seen} | {tok_s:,.0f} tok/s{mfu}")
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
  else:
    if prev_metrics is not None:  # the last step's finiteness (the loop reads one step behind)
      stop_reason = nonfinite_check(prev_metrics, step)
  progress.close()
  return LoopResult(state=state, step=step, stop_reason=stop_reason, first_loss=first_loss, last_loss=last_loss,
                    last_eval=last_eval)


def run_loop(cfg: Any, trainer: Any, state: TrainState, *, workdir: str | os.PathLike, start_step: int,
             total_steps: int, next_inputs: Callable[[int, TrainState], StepInputs], checkpointer: Checkpointer,
             stop: StopSignal | None = None, evaluate: Callable[[int, TrainState], dict[str, Any]] | None = None,
             log_fields: Callable[[int, dict[str, Any], StepInputs], dict[str, Any]] | None = None) -> LoopResult:
  """``train_loop`` with the settings of a trainer config (``log_every_steps``, ``eval_every_steps``,
  ``checkpoint_every_steps``, ``max_consecutive_nonfinite``), metrics to ``<workdir>`` and a progress bar."""
  settings = LoopSettings(total_steps=total_steps, log_every=cfg.log_every_steps, eval_every=cfg.eval_every_steps,
                          checkpoint_every=cfg.checkpoint_every_steps,
                          max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)
  writer = MetricsWriter(workdir)
  try:
    return train_loop(trainer, state, start_step=start_step, settings=settings, next_inputs=next_inputs,
                      checkpointer=checkpointer, writer=writer, progress=Progress(total_steps, start_step),
                      evaluate=evaluate, log_fields=log_fields, flops_per_token=trainer.cfg.flops_per_token,
                      peak_flops=peak_flops_total(), stop=stop)
  finally:
    writer.close()
