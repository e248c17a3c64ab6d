"""The one outer training loop and checkpoint layer every trainer uses (pre-training and SFT; DPD and RL next).

A trainer supplies *what* to train on; this module owns *how a run runs*: stop signals, checkpoint
save/resume/fallback/pruning, metric truncation on resume, the non-finite policy, metric rows, progress, the eval
hook and the summary. Nothing here knows about a particular stage. The fault-tolerance guarantees are described in
docs/faults.md; the checkpoint-directory mechanics live in ``nanbeige_jax.train.resume``.

API
---
``StopSignal()``
    Context manager, entered by a trainer before its set-up: SIGTERM/SIGINT set ``.requested`` (the signal name,
    logged as ``SIGTERM received``) instead of killing the process; the loop finishes its step, checkpoints and
    returns (or returns before the first step when the signal came during set-up). A second signal kills the
    process at once. ``preemption_point(step)`` is the multi-host equivalent
    (``jax.experimental.multihost_utils.reached_preemption_sync_point``; False on one process).

``move_run_aside(workdir) -> [paths]``
    ``--fresh``: renames ``<workdir>/checkpoints`` and ``metrics.jsonl`` to ``<name>.old.<time>`` (nothing deleted).

``check_checkpoint_metadata(workdir, step, meta, *, stage, model_cfg, tokenizer, accept_unstaged=False,
                            stage_description=None)``
    ``resume.ResumeError`` (a ConfigError) when a checkpoint is another stage's, model's or tokenizer's. Use it
    with ``resume.check_workdir`` for the read-only pre-flight check and as ``Checkpointer(check_metadata=...)``.

``init_params(trainer, *, checkpoint_dir=None, step=None, hf_dir=None) -> (params, metadata)``
    Parameters for a new stage, placed in ``trainer.param_shardings``: a params-only read of any checkpoint of this
    project (the stage hand-off; architecture checked against ``trainer.cfg``) or a Hugging Face directory.
    ``metadata`` is the source checkpoint's (``{"stage": "hf", ...}`` for HF).

``Checkpointer(directory, *, metadata, data_state_fn, keep=3, async_save=True, check_metadata=None)``
    ``latest_step()``; ``restore(trainer) -> (TrainState, step, data_state) | None``: the newest step that restores
    completely, corrupt newer ones moved aside (``resume.restore_with_fallback``), checked with ``check_metadata``,
    with the skipped-step count and non-finite streak; ``save(step, state)``: params + opt_state + metadata +
    ``data_state_fn()`` + ``skipped_steps``/``nonfinite_streak`` (a step saved already is skipped), after the previous
    async save committed and keep-last-N pruning that never deletes the newest verified step
    (``resume.prune_checkpoints``); ``last_saved``; ``step_path(step)``; ``close()`` (waits, prunes).

``resume_or_init(trainer, checkpointer, workdir, init_state) -> (state, start_step, data_state | None)``
    Restore or ``init_state()``; on resume drops metric rows logged after the restored step (atomically).

``StepInputs(batch, lr, rope_theta, tokens, seq_len, fields={}, boundary=False)``
    What the trainer hands the loop for one step: the host batch, the LR and RoPE base, the number of tokens the
    step processes (for throughput), its sequence length (MFU), extra metric fields to log (phase name, mixture
    weights, tokens seen, ...) and whether a checkpoint must follow the step (a phase boundary).

``LoopSettings(total_steps, log_every, eval_every, checkpoint_every, max_consecutive_nonfinite=5)``

``train_loop(trainer, state, *, start_step, settings, next_inputs, checkpointer, writer, progress,
             evaluate=None, log_fields=None, flops_per_token=None, peak_flops=None, stop=None) -> LoopResult``
    Runs steps ``start_step .. total_steps - 1``: ``next_inputs(step) -> StepInputs``, ``trainer.train_step``;
    every ``log_every`` steps (and the first and the last) a metric row ``loss, lr, grad_norm, tokens_per_sec,
    steps_per_sec, skipped_steps, [mfu]`` plus ``inputs.fields`` plus ``log_fields(step, host_metrics, inputs)``
    goes to ``writer`` and the progress bar; every ``eval_every`` steps and at the end ``evaluate(step, state)``
    returns a row (written as is); checkpoints every ``checkpoint_every`` steps, after ``inputs.boundary`` steps,
    at the end, and on a stop signal (``stop``: the trainer's ``StopSignal``; the loop enters its own when None).
    Non-finite steps are skipped by the train core; ``max_consecutive_nonfinite`` of them in a row (counted across
    a resume: the streak is restored) stop the run (``LoopResult.stop_reason``; ``raise_if_stopped`` raises
    ``TrainingStopped``). The finite flag is read one step behind so the host never stalls the device pipeline;
    the last step's is read after the loop.

``run_summary(result, checkpointer, *, start_step, total_steps, workdir)``: the common summary fields
(``last_checkpoint`` included); ``write_summary(workdir, summary)``: ``<workdir>/summary.json`` from process 0.
``phase_for_step(plan, step)``, ``tokens_before_step(plan, step)``: schedule-plan lookups.
``eval_sums(trainer, params, batches, rope_theta, num_sources)``, ``per_source_losses(sums, names, prefix=)``.
``peak_flops_total() -> float | None``: all devices' peak FLOP/s (measured on CPU) for MFU.
``print_sharding_report(trainer)``: the resolved sharding, to stderr, from process 0.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.metrics import MetricsWriter, Progress, device_peak_flops, measure_cpu_peak_flops
from nanbeige_jax.train import resume
from nanbeige_jax.train.state import TrainState

log = logging.getLogger("nanbeige_jax.runner")

METRICS_FILE = "metrics.jsonl"  # what MetricsWriter writes in the workdir


class RunError(ValueError):
  """A run cannot start or resume as configured (wrong workdir contents, missing init checkpoint, ...)."""


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
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # the preemption service is only set up by jax.distributed on some platforms
    return False


# --- trainer configs -----------------------------------------------------------------------------------------
MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")
RUN_POSITIVE_FIELDS = ("seq_len", "global_batch_size", "microbatches", "log_every_steps", "eval_every_steps",
                       "checkpoint_every_steps", "keep_checkpoints")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The run settings every trainer config has (a trainer's config subclasses this and may change defaults)."""

  schedule: Any = None                      # FGWSDSchedule (gin: @FGWSDSchedule())
  optimizer: Any = None                     # OptimizerConfig (gin: @OptimizerConfig()); None -> defaults
  seq_len: int = 256                        # for phases that do not set their own seq_len
  global_batch_size: int = 16               # sequences (packed rows) per optimizer step (all processes)
  microbatches: int = 1                     # gradient accumulation: the global batch is split into this many
  seed: int = 0
  log_every_steps: int = 10
  eval_every_steps: int = 100
  eval_batches: int = 4
  checkpoint_every_steps: int = 250
  keep_checkpoints: int = 3                 # keep-last-N verified checkpoints (the newest good one always stays)
  async_checkpointing: bool = True
  vocab_chunk: int = 8192
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
  max_steps: int | None = None              # stop early after this many steps in total (smoke runs)
  max_consecutive_nonfinite: int = 5        # stop after this many non-finite steps in a row (0 = never)


def validate_run_config(cfg: Any, *, extra_positive: tuple[str, ...] = (), sources_hint: str = "...") -> None:
  """The checks every trainer config shares (ValueError naming ``<Class>.<field>``): schedule and optimizer types,
  positive ints (``RUN_POSITIVE_FIELDS`` + ``extra_positive``), batch divisible by micro-batches,
  ``max_consecutive_nonfinite`` >= 0, ``max_steps`` positive or None, ``sources`` a non-empty dict of
  ``{kind: ...}`` specs covering every name the schedule's mixtures use, and the mesh keys."""
  from nanbeige_jax.config import check_keys
  from nanbeige_jax.optim.optimizer import OptimizerConfig
  from nanbeige_jax.optim.schedules import FGWSDSchedule
  label = type(cfg).__name__
  if not isinstance(cfg.schedule, FGWSDSchedule):
    raise ValueError(f"{label}.schedule: expected an FGWSDSchedule, found {type(cfg.schedule).__name__}")
  if cfg.optimizer is not None and not isinstance(cfg.optimizer, OptimizerConfig):
    raise ValueError(f"{label}.optimizer: expected an OptimizerConfig, found {type(cfg.optimizer).__name__}")
  for name in RUN_POSITIVE_FIELDS + tuple(extra_positive):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{label}.{name}: expected a positive int, found {value!r}")
  if cfg.global_batch_size % cfg.microbatches:
    raise ValueError(f"{label}.global_batch_size={cfg.global_batch_size} is not divisible by "
                     f"microbatches={cfg.microbatches}")
  limit = cfg.max_consecutive_nonfinite
  if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
    raise ValueError(f"{label}.max_consecutive_nonfinite: expected an int >= 0 (0 = never stop), found {limit!r}")
  if cfg.max_steps is not None and (isinstance(cfg.max_steps, bool) or not isinstance(cfg.max_steps, int)
                                    or cfg.max_steps <= 0):
    raise ValueError(f"{label}.max_steps: expected a positive int or None, found {cfg.max_steps!r}")
  if not isinstance(cfg.sources, dict) or not cfg.sources:
    raise ValueError(f"{label}.sources: expected a non-empty dict name -> {{kind: {sources_hint}, ...}}")
  for name, spec in cfg.sources.items():
    if not isinstance(spec, dict) or "kind" not in spec:
      raise ValueError(f"{label}.sources[{name!r}]: expected a dict with a 'kind' key, found {spec!r}")
  check_keys(f"{label}.mesh", cfg.mesh, MESH_KEYS)
  used = set()
  for phase in cfg.schedule.phases:
    used.update(phase.mixture)
  unknown = sorted(used - set(cfg.sources))
  if unknown:
    raise ValueError(f"{label}: the schedule's mixtures name source(s) {unknown} that are not in "
                     f"{label}.sources {sorted(cfg.sources)}")


# --- workdir and initial parameters ----------------------------------------------------------------------------
def move_run_aside(workdir: str | os.PathLike) -> list[pathlib.Path]:
  """``--fresh``: rename ``<workdir>/checkpoints`` and ``metrics.jsonl`` to ``<name>.old.<unix time>`` (nothing is
  deleted). Call it only once the run's input is validated."""
  workdir = pathlib.Path(workdir)
  moved = []
  if jax.process_index() != 0:
    return moved
  stamp = int(time.time())
  for path in (workdir / "checkpoints", workdir / METRICS_FILE):
    if path.exists():
      aside = path.with_name(f"{path.name}.old.{stamp}")
      os.replace(path, aside)
      log.warning("--fresh: moved %s aside to %s", path, aside)
      moved.append(aside)
  return moved


def check_checkpoint_metadata(workdir: str | os.PathLike, step: int, meta: dict, *, stage: str,
                              model_cfg: Any, tokenizer: Any | None, accept_unstaged: bool = False,
                              stage_description: str | None = None) -> None:
  """Raise ``resume.ResumeError`` when checkpoint ``step`` of ``workdir`` is not this run's: another stage, model
  architecture or tokenizer. ``accept_unstaged``: a checkpoint without a ``stage`` entry counts as this stage;
  ``stage_description`` names the stage in the message (default: ``repr(stage)``)."""
  found = meta.get("stage")
  if found != stage and not (accept_unstaged and found is None):
    raise resume.ResumeError(f"{workdir}: checkpoint step {step} is a {found!r} checkpoint, not a "
                             f"{stage_description or repr(stage)} one (stage {found!r}, this run is stage "
                             f"{stage!r}); refusing to resume into it: use another --workdir or pass --fresh")
  try:
    ckpt_lib.check_model_config(meta, model_cfg)
  except ckpt_lib.CheckpointError as e:
    raise resume.ResumeError(f"{workdir} holds a checkpoint (step {step}) of a different model ({e}); refusing to "
                             f"resume into it: use another --workdir or pass --fresh to start over") from None
  if tokenizer is not None and meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint()):
    raise resume.ResumeError(f"{workdir}: checkpoint step {step} was trained with tokenizer "
                             f"{meta.get('tokenizer_fingerprint')}, but the configured tokenizer "
                             f"{tokenizer.source!r} is {tokenizer.fingerprint()}; pass --fresh to start over")


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
  """One run's checkpoints: full state + metadata + the data state, resumable exactly, with fallback and verified
  keep-last-N (``nanbeige_jax.train.resume``)."""

  def __init__(self, directory: str | os.PathLike, *, metadata: dict, data_state_fn: Callable[[], dict],
               keep: int = 3, async_save: bool = True,
               check_metadata: Callable[[int, dict], None] | None = None):
    self.directory = pathlib.Path(directory)
    self.metadata = metadata
    self.data_state_fn = data_state_fn
    self.keep = keep
    self.check_metadata = check_metadata
    self._async_save = async_save
    self.manager = self._open()
    self.last_saved: int | None = self.manager.latest_step()

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
    return state, int(restored.step), data_state

  def save(self, step: int, state: TrainState) -> bool:
    if self.last_saved == step:
      return False
    # The previous (async) save must be committed before it can be verified and older steps pruned; orbax's own
    # save would wait for it here anyway.
    self.manager.wait_until_finished()
    resume.prune_checkpoints(self.manager, self.keep)
    data_state = dict(self.data_state_fn())
    data_state["skipped_steps"] = int(state.skipped_steps)
    data_state["nonfinite_streak"] = int(state.bad_streak)
    self.manager.save(step, params=state.params, opt_state=state.opt_state, metadata=self.metadata,
                      data_state=data_state)
    self.last_saved = step
    return True

  def close(self) -> None:
    self.manager.wait_until_finished()
    resume.prune_checkpoints(self.manager, self.keep)
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
    dropped = resume.truncate_metrics(pathlib.Path(workdir) / METRICS_FILE, start_step)
    if dropped:
      log.warning("dropped %d metric row(s) logged after step %d by the interrupted run", dropped, start_step)
  return state, start_step, data_state


def print_sharding_report(trainer: Any) -> None:
  """The resolved parameter/optimizer sharding, once, to stderr, from process 0."""
  if jax.process_index() == 0:
    from nanbeige_jax.sharding import format_sharding_report
    print(format_sharding_report(trainer), file=sys.stderr, flush=True)


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

  def nonfinite_check(metrics: Any, step_of_metrics: int) -> str | None:
    nonlocal bad_streak
    bad_streak = 0 if bool(metrics["finite"]) else bad_streak + 1
    if limit and bad_streak >= limit:
      return (f"{bad_streak} consecutive non-finite steps (limit {limit}) ending at step {step_of_metrics}; their "
              f"updates were skipped and the last good checkpoint "
              f"({checkpointer.step_path(checkpointer.last_saved)}) is intact")
    return None

  step = start_step
  while step < total:
    if stop.requested:  # arrived during set-up or compilation: nothing trained since the last checkpoint
      stop_reason = f"preempted ({stop.requested}) at step {step}"
      break
    inputs = next_inputs(step)
    state, metrics = trainer.train_step(state, inputs.batch, inputs.lr, inputs.rope_theta)
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
             total_steps: int, next_inputs: Callable[[int], StepInputs], checkpointer: Checkpointer,
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


def plan_run(schedule: Any, cfg: Any, model_cfg: Any) -> tuple[list[Any], int]:
  """``(the schedule's step plan, total steps)`` for a trainer config (``global_batch_size``, ``seq_len``,
  ``max_steps``); ConfigError when a phase's sequence length exceeds the model's positions."""
  from nanbeige_jax.config import ConfigError
  from nanbeige_jax.optim.schedules import plan_steps
  plan = plan_steps(schedule, cfg.global_batch_size, seq_len=cfg.seq_len, rope_theta=model_cfg.rope_theta)
  for entry in plan:
    if entry.seq_len > model_cfg.max_position_embeddings:
      raise ConfigError(f"phase {entry.phase.name!r}: seq_len {entry.seq_len} exceeds the model's "
                        f"max_position_embeddings {model_cfg.max_position_embeddings}")
  total_steps = plan[-1].end_step
  return plan, total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)


def run_summary(result: LoopResult, checkpointer: Checkpointer, *, start_step: int, total_steps: int,
                workdir: str | os.PathLike) -> dict[str, Any]:
  """The summary fields every trainer reports (a trainer adds its own)."""
  return {"start_step": start_step, "total_steps": total_steps, "final_step": result.step,
          "first_loss": result.first_loss, "last_loss": result.last_loss,
          "eval_loss": (result.last_eval or {}).get("eval/loss"), "stopped": result.stop_reason,
          "skipped_steps": int(result.state.skipped_steps), "last_checkpoint": checkpointer.last_saved,
          "workdir": str(workdir)}


def raise_if_stopped(result: LoopResult) -> None:
  """TrainingStopped when the run stopped on the non-finite policy (preemption is a normal return)."""
  if result.stop_reason and "non-finite" in result.stop_reason:
    raise TrainingStopped(result.stop_reason)


def phase_for_step(plan: list[Any], step: int) -> Any:
  """The schedule phase (``PhasePlan``) that step ``step`` (0-based) belongs to; the last one past the end."""
  for entry in plan:
    if entry.start_step <= step < entry.end_step:
      return entry
  return plan[-1]


def tokens_before_step(plan: list[Any], step: int) -> int:
  """Tokens the schedule has consumed before step ``step`` (0-based)."""
  entry = phase_for_step(plan, step)
  return entry.start_tokens + (step - entry.start_step) * entry.tokens_per_step


def eval_sums(trainer: Any, params: Any, batches: Any, rope_theta: float, num_sources: int
              ) -> tuple[float, float, dict[str, np.ndarray]]:
  """``(loss_sum, weight_sum, per-source sums)`` of ``trainer.eval_step`` over an iterable of host batches."""
  loss_sum = weight_sum = 0.0
  sums = {"source_nll": np.zeros(num_sources), "source_tokens": np.zeros(num_sources)}
  for batch in batches:
    out = trainer.eval_step(params, batch, rope_theta)
    loss_sum += float(out["loss_sum"])
    weight_sum += float(out["weight_sum"])
    for key in sums:
      sums[key] += np.asarray(out["sums"][key])
  return loss_sum, weight_sum, sums


def per_source_losses(sums: dict[str, Any], names: list[str], *, prefix: str) -> dict[str, float]:
  """``{prefix + name: mean loss}`` for the sources with tokens in ``sums`` (the LM loss's per-source sums)."""
  nll, tokens = np.asarray(sums["source_nll"]), np.asarray(sums["source_tokens"])
  return {f"{prefix}{n}": float(nll[i] / tokens[i]) for i, n in enumerate(names) if tokens[i] > 0}


def run_for_launcher(run: Callable[[], dict[str, Any]], workdir: str | os.PathLike) -> dict[str, Any]:
  """What a launcher's ``main`` does with a run: one ``error: ...``/``stopped: ...`` line and a non-zero exit on bad
  input or the non-finite stop, else one ``done: ...`` line on stdout. Returns the summary."""
  try:
    summary = run()
  except TrainingStopped as e:
    sys.exit(f"stopped: {e}")
  except (ValueError, ckpt_lib.CheckpointError) as e:  # ConfigError and ResumeError are ValueErrors
    sys.exit(f"error: {' '.join(str(e).split())}")
  first, last = summary.get("first_loss"), summary.get("last_loss")
  stage = f"{summary['stage']} " if summary.get("stage") else ""
  msg = f"done: {stage}step {summary['final_step']}/{summary['total_steps']}"
  if first and last:
    msg += f", loss {first:.3f} -> {last:.3f} ({(1 - last / first):.0%} lower)"
  if summary.get("eval_loss") is not None:
    msg += f", eval loss {summary['eval_loss']:.3f}"
  if summary.get("stopped"):
    msg += f" [{summary['stopped']}]"
  print(msg + f"; workdir {workdir}")
  return summary


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / "summary.json"
    tmp = path.with_suffix(f".json.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, path)
