"""The one set-up sequence every stage runs (pre-training, SFT; DPD and RL next), and the run config they share.

A stage module holds only its ``Stage`` spec: data, ``next_inputs``, evaluation, metadata and the objective.
``run_stage(cfg, workdir, spec)`` does the rest, in this order: stop-signal handling from the first line; read-only
pre-flight (``spec.prepare``: sources, tokenizer, model config, init source; the workdir's newest checkpoint must be
this stage's, model's and tokenizer's; the schedule plan; the mesh and the batch split), so bad input writes nothing;
then ``--fresh`` moves the old run aside, ``spec.write_workdir`` (tokenizer), the operative config, the ``Trainer``
(``spec.objective``, ``spec.frozen_configs``), the frozen models' parameters (``spec.frozen_params``),
``spec.build_data``, the ``Checkpointer`` (``spec.metadata``,
``spec.data_state``), resume or ``spec.init_state``, the loop (``spec.next_inputs(run, step, state)``,
``spec.evaluate``, ``spec.log_fields``), the summary (``spec.summary``) and the plot.

``RunConfig``: every field ``run_stage`` and the loop read (a stage's config subclasses it).
``StageRun``: what a spec sees (cfg, workdir, model_cfg, tokenizer, plan, total_steps, trainer, data, resume...).
``run_for_launcher(run, workdir)``: a launcher's exit policy (one ``error:``/``stopped:``/``done:`` line).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable

import gin
import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.config import ConfigError, build, parse_gin
from nanbeige_jax.model.attention import check_attention_memory
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.sharding import DEFAULT_RULES, format_sharding_report, make_mesh
from nanbeige_jax.train import resume
from nanbeige_jax.train.checkpointing import (Checkpointer, RunError, check_checkpoint_metadata, move_run_aside,
                                              resume_or_init)
from nanbeige_jax.train.loop import (METRICS_FILE, LoopResult, StepInputs, StopSignal, TrainingStopped, run_loop)
from nanbeige_jax.train.run_config import (MESH_KEYS, RESUME_FIELDS, RUN_POSITIVE_FIELDS, RunConfig,  # noqa: F401
                                           check_resume_changes, phase_for_step, plan_run, resume_record,
                                           tokens_before_step, validate_run_config)
from nanbeige_jax.train.step import Trainer, check_batch_split

log = logging.getLogger("nanbeige_jax.stage")

def print_sharding_report(trainer: Any) -> None:
  """The resolved parameter/optimizer sharding, once, to stderr, from process 0."""
  if jax.process_index() == 0:
    print(format_sharding_report(trainer), file=sys.stderr, flush=True)


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


def launch_stage(config_cls: type, run_fn: Callable[..., dict[str, Any]], gin_files: list[str],
                 bindings: list[str], workdir: str, *, fresh: bool) -> dict[str, Any]:
  """A training launcher's ``main`` after its flags became gin ``bindings``: parse the gin files, build and validate
  ``config_cls``, ``run_fn(cfg, workdir, fresh=, operative_config=, sharding_report=True)``, exit as
  ``run_for_launcher`` says."""
  def run() -> dict[str, Any]:
    parse_gin(gin_files, bindings)
    return run_fn(build(config_cls), workdir, fresh=fresh, operative_config=gin.config_str(), sharding_report=True)
  return run_for_launcher(run, workdir)


def write_summary(workdir: str | os.PathLike, summary: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "summary.json"), json.dumps(summary, indent=2, default=str))


# --- the stage template ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageRun:
  """What ``run_stage`` knows about a run, handed to every hook of the spec (hooks fill in their parts)."""

  cfg: Any
  workdir: paths.Path                       # any path-layer scheme (gs://...): use paths.* or its epath methods
  fresh: bool
  stop: StopSignal
  model_cfg: Any = None                     # set by spec.prepare
  tokenizer: Any = None                     # set by spec.prepare (or spec.write_workdir when trained there)
  resume: tuple[int, dict] | None = None    # (step, metadata) of the checkpoint this run resumes, read-only
  plan: list[Any] | None = None
  total_steps: int = 0
  mesh: Any = None
  trainer: Trainer | None = None
  frozen: dict[str, Any] = dataclasses.field(default_factory=dict)  # {role: params}, placed (spec.frozen_params)
  data: Any = None
  tokens_after: int = 0                     # tokens seen after the last step whose batch was drawn (checkpointed)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the spec's own set-up state

  @property
  def ckpt_dir(self) -> paths.Path:
    return self.workdir / "checkpoints"

  def schedule_inputs(self, step: int, batch: dict[str, np.ndarray], *, tokens: int,
                      fields: dict[str, Any] | None = None, frozen: dict[str, Any] | None = None) -> StepInputs:
    """``StepInputs`` of an FG-WSD stage: LR and RoPE base of the step's phase, phase/mixture/tokens-seen fields,
    a checkpoint at the phase end. The LR is the schedule's at the end of the step's tokens (``step_lr``: the first
    step does not run at LR 0); the tokens seen after the step are what the next checkpoint records."""
    entry = phase_for_step(self.plan, step)
    tokens_seen = tokens_before_step(self.plan, step)
    self.tokens_after = tokens_seen + entry.tokens_per_step
    weights = entry.phase.normalized_mixture()
    row = {"phase": entry.phase.name, "phase_index": entry.index, "tokens_seen": tokens_seen + entry.tokens_per_step,
           **(fields or {})}
    row.update({f"mixture/{n}": weights.get(n, 0.0) for n in sorted(self.cfg.sources)})
    return StepInputs(batch=batch, lr=self.cfg.schedule.step_lr(tokens_seen, entry.tokens_per_step),
                      rope_theta=self.rope_theta(step),
                      tokens=tokens, seq_len=entry.seq_len, fields=row, boundary=step + 1 == entry.end_step,
                      frozen=frozen)

  def rope_theta(self, step: int) -> float:
    return phase_for_step(self.plan, step).phase.rope_theta or self.model_cfg.rope_theta

  def phase_batch(self, entry: Any, draw: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The host batch of one step of phase ``entry``: ``entry.rows / cfg.global_batch_size`` draws of the data
    iterator (each ``cfg.global_batch_size`` rows, all processes) concatenated, so a phase may set its own rows per
    step (``Phase.global_batch_size``) while every draw stays deterministic and resumable."""
    draws = [draw() for _ in range(entry.rows // self.cfg.global_batch_size)]
    return draws[0] if len(draws) == 1 else {k: np.concatenate([d[k] for d in draws]) for k in draws[0]}

  def checkpoint_metadata(self, spec: "Stage", step: int) -> dict:
    """The metadata of a checkpoint saved after ``step`` steps: the spec's, at the RoPE base and phase the
    parameters were trained at (its last step's), with the tokens seen and the resume record (``resume_record``)."""
    last = max(step - 1, 0)
    meta = ckpt_lib.with_operative_rope(spec.metadata(self), rope_theta=self.rope_theta(last),
                                        phase=phase_for_step(self.plan, last).phase.name)
    meta["tokens_seen"] = int(self.tokens_after)
    meta["run"] = json.loads(json.dumps(resume_record(self.cfg)))
    return meta


class Stage:
  """A stage's spec. Subclass, set ``name`` (the checkpoint metadata stage) and fill the hooks."""

  name = "stage"
  stage_description: str | None = None      # how errors name the stage (default: repr(name))
  accept_unstaged = False                   # a checkpoint without a stage entry counts as this stage

  def stage_name(self, run: StageRun) -> str:
    return self.name

  def prepare(self, run: StageRun) -> None:
    """Read-only set-up: validate, build sources, set ``run.model_cfg`` (and ``run.tokenizer`` when it exists)."""
    raise NotImplementedError

  def write_workdir(self, run: StageRun) -> None:
    """First writes into the workdir (e.g. train or copy the tokenizer)."""

  def objective(self, run: StageRun) -> Any:
    raise NotImplementedError

  def frozen_configs(self, run: StageRun) -> dict[str, Any]:
    """``{role: ModelConfig}`` of the frozen models the objective reads (reference, teacher, reward model)."""
    return {}

  def frozen_params(self, run: StageRun) -> dict[str, Any]:
    """``{role: params}`` for ``frozen_configs`` (e.g. ``checkpointing.init_params(run.trainer, role=...)``); placed
    once in their shardings and passed to every step whose ``StepInputs.frozen`` is None."""
    return {}

  def build_data(self, run: StageRun) -> Any:
    raise NotImplementedError

  def metadata(self, run: StageRun) -> dict:
    raise NotImplementedError

  def data_state(self, run: StageRun) -> dict:
    return {"iterator": run.data.get_state()}

  def restore_data(self, run: StageRun, data_state: dict) -> None:
    run.data.set_state(data_state["iterator"])

  def init_state(self, run: StageRun) -> Any:
    return run.trainer.init_state(run.cfg.seed)

  def next_inputs(self, run: StageRun, step: int, state: Any) -> StepInputs:
    raise NotImplementedError

  def log_fields(self, run: StageRun, step: int, host: dict[str, Any], inputs: StepInputs) -> dict[str, Any]:
    return {}

  def evaluate(self, run: StageRun, step: int, state: Any) -> dict[str, Any] | None:
    return None

  def summary(self, run: StageRun, summary: dict[str, Any]) -> dict[str, Any]:
    return summary

  def check_metadata(self, run: StageRun, step: int, meta: dict) -> None:
    check_checkpoint_metadata(run.workdir, step, meta, stage=self.stage_name(run), model_cfg=run.model_cfg,
                              tokenizer=run.tokenizer, accept_unstaged=self.accept_unstaged,
                              stage_description=self.stage_description,
                              rope_theta=expected_rope_theta(run, step, meta))


def expected_rope_theta(run: StageRun, step: int, meta: dict) -> float | None:
  """The RoPE base checkpoint ``step`` must have been trained at under this run's schedule: that of the phase of its
  last step (found by the tokens it records). None (the model config's base) for checkpoints that predate the record
  or before the plan exists; the checkpoint's own base when ``allow_resume_changes`` says the schedule may differ."""
  if run.plan is None or step <= 0 or "rope_theta" not in meta:
    return None
  if run.cfg.allow_resume_changes:
    return float(meta["rope_theta"])
  tokens = meta.get("tokens_seen")
  if isinstance(tokens, int) and tokens > 0:
    for entry in run.plan:
      if entry.num_steps and 0 <= tokens - 1 - entry.start_tokens < entry.num_steps * entry.tokens_per_step:
        return entry.phase.rope_theta or run.model_cfg.rope_theta
  return run.rope_theta(step - 1)


def resume_at_tokens(run: StageRun, start_step: int, data_state: dict) -> None:
  """After a restore: the run continues at the tokens the checkpoint recorded. When they are not where this run's
  plan puts step ``start_step`` (a batch or sequence length changed on purpose: ``allow_resume_changes``), the rest
  of the schedule is planned from that token count, so the LR, phase and mixture follow the tokens seen."""
  tokens = data_state.get("tokens_seen")
  if not isinstance(tokens, int):
    run.tokens_after = tokens_before_step(run.plan, start_step)
    return
  run.tokens_after = tokens
  if tokens == tokens_before_step(run.plan, start_step):
    return
  if not run.cfg.allow_resume_changes:  # check_resume_changes passed, so the plan itself cannot explain it
    raise ConfigError(f"{run.workdir}: checkpoint step {start_step} recorded {tokens} tokens seen but this run's "
                      f"plan has {tokens_before_step(run.plan, start_step)} before that step; set "
                      f"{type(run.cfg).__name__}.allow_resume_changes=True to continue at the recorded tokens")
  run.plan, run.total_steps = plan_run(run.cfg.schedule, run.cfg, run.model_cfg, start_step=start_step,
                                       start_tokens=tokens)
  log.warning("resuming at step %d with %d tokens seen: the remaining schedule is re-planned from the tokens "
              "(allow_resume_changes)", start_step, tokens)


def read_resume_metadata(run: StageRun, spec: Stage) -> tuple[int, dict] | None:
  """Read-only: ``(step, metadata)`` of the newest readable checkpoint in the workdir (None when none or
  ``--fresh``), refused when it is another stage's (the model and tokenizer are checked once known)."""
  if run.fresh:
    return None
  found: dict[str, Any] = {}

  def capture(step: int, meta: dict) -> None:
    check_checkpoint_metadata(run.workdir, step, meta, stage=spec.stage_name(run), model_cfg=None, tokenizer=None,
                              accept_unstaged=spec.accept_unstaged, stage_description=spec.stage_description)
    found["resume"] = (step, meta)
  resume.check_workdir(run.ckpt_dir, capture)
  return found.get("resume")


def check_run_plan(run: StageRun, spec: Stage, *, platform: str | None = None, devices: Any = None) -> None:
  """The launcher's pre-flight once the model config is known (read-only; ConfigError, one line): the schedule plan
  against the model's positions and the draw size, an existing checkpoint's batch/seq/schedule, stage, model and
  tokenizer, the mesh, every phase's batch split over the mesh, and the attention memory of every phase's rows on
  ``platform`` (default: the compile target)."""
  cfg, label = run.cfg, type(run.cfg).__name__
  if cfg.global_batch_size % jax.process_count():
    raise ConfigError(f"{label}.global_batch_size {cfg.global_batch_size} is not divisible by "
                      f"{jax.process_count()} processes")
  run.plan, run.total_steps = plan_run(cfg.schedule, cfg, run.model_cfg)
  if run.resume is not None:
    check_resume_changes(cfg, *run.resume, where=str(run.workdir))
    spec.check_metadata(run, *run.resume)
  try:
    run.mesh = make_mesh(**cfg.mesh, devices=devices)
  except ValueError as e:
    raise ConfigError(f"{label}.mesh {cfg.mesh}: {' '.join(str(e).split())}") from None
  try:
    check_batch_split(cfg.global_batch_size, cfg.microbatches, run.mesh, DEFAULT_RULES,
                      what=f"{label}.global_batch_size")
    for entry in run.plan:
      if entry.num_steps and entry.rows != cfg.global_batch_size:
        check_batch_split(entry.rows, cfg.microbatches, run.mesh, DEFAULT_RULES,
                          what=f"phase {entry.phase.name!r} global_batch_size")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    for rows, seq_len in sorted({(entry.rows, entry.seq_len) for entry in run.plan if entry.num_steps}):
      check_attention_memory(run.model_cfg, rows // cfg.microbatches, seq_len, platform=platform)
  except ValueError as e:
    raise ConfigError(f"{label}: {e}") from None


def validate_config(cfg: Any, spec: Stage, model_cfg: Any, *, platform: str | None = None,
                    devices: Any = None) -> StageRun:
  """Everything the launcher checks before a run starts except what needs the data and the workdir (sources,
  tokenizer, init checkpoint): ``check_run_plan`` for ``model_cfg`` (the model the run trains, e.g. the preset an
  SFT init checkpoint holds), on ``devices`` (default: this host's) and ``platform`` (the run's, e.g. ``"tpu"`` when
  checking a pod config on a CPU host). Returns the planned ``StageRun`` (plan, total_steps, mesh)."""
  run = StageRun(cfg=cfg, workdir=paths.as_path("."), fresh=True, stop=StopSignal())
  run.model_cfg = model_cfg
  check_run_plan(run, spec, platform=platform, devices=devices)
  return run


def run_stage(cfg: Any, workdir: str | os.PathLike, spec: Stage, *, fresh: bool = False,
              operative_config: str | None = None, sharding_report: bool = False) -> dict[str, Any]:
  """Train (or resume) stage ``spec`` with ``cfg`` in ``workdir``; returns the summary (also ``summary.json``).

  ConfigError (one line, nothing written) on bad input, ``resume.ResumeError`` when the workdir cannot be resumed,
  TrainingStopped after too many consecutive non-finite steps. SIGTERM/SIGINT during the call (set-up included)
  checkpoint after the current step and return normally."""
  with StopSignal() as stop:
    run = StageRun(cfg=cfg, workdir=paths.as_path(workdir), fresh=fresh, stop=stop)
    return _run_stage(run, spec, operative_config, sharding_report)


def _run_stage(run: StageRun, spec: Stage, operative_config: str | None, sharding_report: bool) -> dict[str, Any]:
  cfg = run.cfg
  # Read-only pre-flight: bad input writes nothing.
  run.resume = read_resume_metadata(run, spec)
  try:
    spec.prepare(run)
  except RunError as e:
    raise ConfigError(str(e)) from None
  check_run_plan(run, spec)
  if jax.process_count() > 1:
    # Every process reads the workdir (resume pre-flight) before any writes it: without this barrier a process may
    # see the checkpoint directory another has just created and open it on a different collective path.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("nanbeige_jax stage pre-flight done")

  # From here on the workdir is written.
  if run.fresh:
    move_run_aside(run.workdir)
  paths.mkdir(run.workdir)
  spec.write_workdir(run)
  if operative_config and jax.process_index() == 0:
    paths.write_text(paths.join(run.workdir, "operative_config.gin"), operative_config)
  opt_cfg = cfg.optimizer or OptimizerConfig()
  run.trainer = Trainer(run.model_cfg, make_optimizer(opt_cfg), spec.objective(run), mesh=run.mesh,
                        rules=DEFAULT_RULES, microbatches=cfg.microbatches, frozen_configs=spec.frozen_configs(run))
  if sharding_report:
    print_sharding_report(run.trainer)
  run.frozen = run.trainer.put_frozen(spec.frozen_params(run))
  run.data = spec.build_data(run)
  checkpointer = Checkpointer(run.ckpt_dir, metadata=lambda step: run.checkpoint_metadata(spec, step),
                              keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing,
                              data_state_fn=lambda: {**spec.data_state(run), "tokens_seen": int(run.tokens_after)},
                              targets=(run.trainer.abstract_params, run.trainer.abstract_opt_state),
                              check_metadata=lambda step, meta: spec.check_metadata(run, step, meta))
  try:
    state, start_step, data_state = resume_or_init(run.trainer, checkpointer, run.workdir,
                                                   lambda: spec.init_state(run))
    if data_state is not None:
      spec.restore_data(run, data_state)
      resume_at_tokens(run, start_step, data_state)
    evaluate = None
    if cfg.eval_batches and type(spec).evaluate is not Stage.evaluate:
      evaluate = lambda step, st: spec.evaluate(run, step, st)  # noqa: E731
    def next_inputs(step: int, st: Any) -> StepInputs:
      inputs = spec.next_inputs(run, step, st)
      return inputs if inputs.frozen is not None else dataclasses.replace(inputs, frozen=run.frozen)
    result = run_loop(cfg, run.trainer, state, workdir=run.workdir, start_step=start_step,
                      total_steps=run.total_steps, next_inputs=next_inputs,
                      checkpointer=checkpointer, stop=run.stop, evaluate=evaluate,
                      log_fields=lambda step, host, inputs: spec.log_fields(run, step, host, inputs))
  finally:
    checkpointer.close()
  summary = run_summary(result, checkpointer, start_step=start_step, total_steps=run.total_steps,
                        workdir=run.workdir)
  summary = spec.summary(run, summary)
  write_summary(run.workdir, summary)
  if jax.process_index() == 0 and cfg.plot and result.stop_reason is None:
    from nanbeige_jax.plot import plot_run  # matplotlib: only when a plot is asked for
    summary["plot"] = plot_run(paths.join(run.workdir, METRICS_FILE), paths.join(run.workdir, "run.png"))
  raise_if_stopped(result)
  return summary
