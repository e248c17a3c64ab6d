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

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.config import ConfigError, as_dict, check_keys
from nanbeige_jax.model.attention import check_attention_memory
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.optim.schedules import FGWSDSchedule, plan_steps
from nanbeige_jax.sharding import DEFAULT_RULES, format_sharding_report, make_mesh
from nanbeige_jax.train import resume
from nanbeige_jax.train.checkpointing import (Checkpointer, RunError, check_checkpoint_metadata, move_run_aside,
                                              resume_or_init)
from nanbeige_jax.train.loop import (METRICS_FILE, LoopResult, StepInputs, StopSignal, TrainingStopped, run_loop)
from nanbeige_jax.train.step import Trainer, check_batch_split

log = logging.getLogger("nanbeige_jax.stage")

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
  sources: dict = dataclasses.field(default_factory=dict)  # name -> {kind: ...}: the schedule's mixtures name these
  plot: bool = False                        # write <workdir>/run.png at the end
  # A resume whose global batch, sequence length or schedule differ from the checkpoint's is refused unless this is
  # set; then the run continues at the checkpoint's token count (LR, phase and mixture follow the tokens seen).
  allow_resume_changes: bool = False


def validate_run_config(cfg: Any, *, extra_positive: tuple[str, ...] = (), sources_hint: str = "...") -> None:
  """The checks every trainer config shares (ValueError naming ``<Class>.<field>``): schedule and optimizer types,
  positive ints (``RUN_POSITIVE_FIELDS`` + ``extra_positive``), batch divisible by micro-batches,
  ``max_consecutive_nonfinite`` >= 0, ``max_steps`` positive or None, ``sources`` a non-empty dict of
  ``{kind: ...}`` specs covering every name the schedule's mixtures use, and the mesh keys."""
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
  if not isinstance(cfg.allow_resume_changes, bool):
    raise ValueError(f"{label}.allow_resume_changes: expected a bool, found {cfg.allow_resume_changes!r}")
  check_keys(f"{label}.mesh", cfg.mesh, MESH_KEYS)
  used = set()
  for phase in cfg.schedule.phases:
    used.update(phase.mixture)
  unknown = sorted(used - set(cfg.sources))
  if unknown:
    raise ValueError(f"{label}: the schedule's mixtures name source(s) {unknown} that are not in "
                     f"{label}.sources {sorted(cfg.sources)}")


def print_sharding_report(trainer: Any) -> None:
  """The resolved parameter/optimizer sharding, once, to stderr, from process 0."""
  if jax.process_index() == 0:
    print(format_sharding_report(trainer), file=sys.stderr, flush=True)


def plan_run(schedule: Any, cfg: Any, model_cfg: Any, *, start_step: int = 0, start_tokens: int = 0
             ) -> tuple[list[Any], int]:
  """``(the schedule's step plan, total steps)`` for a trainer config (``global_batch_size``, ``seq_len``,
  ``max_steps``); ConfigError when a phase's sequence length exceeds the model's positions. ``start_step``/
  ``start_tokens``: the plan of a run resuming at that step and token count (``optim.schedules.plan_steps``)."""
  plan = plan_steps(schedule, cfg.global_batch_size, seq_len=cfg.seq_len, rope_theta=model_cfg.rope_theta,
                    start_step=start_step, start_tokens=start_tokens)
  for entry in plan:
    if entry.seq_len > model_cfg.max_position_embeddings:
      raise ConfigError(f"phase {entry.phase.name!r}: seq_len {entry.seq_len} exceeds the model's "
                        f"max_position_embeddings {model_cfg.max_position_embeddings}")
  total_steps = plan[-1].end_step
  return plan, total_steps if cfg.max_steps is None else min(total_steps, cfg.max_steps)


RESUME_FIELDS = ("global_batch_size", "seq_len", "schedule")


def resume_record(cfg: Any) -> dict[str, Any]:
  """What a resume must agree with (stored in every checkpoint's metadata as ``run``): the global batch, the default
  sequence length and the whole schedule (its phases carry their own lengths and RoPE bases)."""
  return {"global_batch_size": cfg.global_batch_size, "seq_len": cfg.seq_len, "schedule": as_dict(cfg.schedule)}


_MISSING = "<absent>"


def _first_difference(saved: Any, now: Any, path: str) -> tuple[str, Any, Any] | None:
  """``(key path, saved value, current value)`` of the first difference between two JSON trees, or None."""
  if isinstance(saved, dict) and isinstance(now, dict):
    for key in list(saved) + [k for k in now if k not in saved]:
      diff = _first_difference(saved.get(key, _MISSING), now.get(key, _MISSING), f"{path}.{key}")
      if diff:
        return diff
    return None
  if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
    for i, (a, b) in enumerate(zip(saved, now)):
      diff = _first_difference(a, b, f"{path}[{i}]")
      if diff:
        return diff
    return None
  return None if saved == now else (path, saved, now)


def check_resume_changes(cfg: Any, step: int, meta: dict, where: str) -> list[str]:
  """The resume-record fields (``resume_record``) in which ``cfg`` differs from checkpoint ``meta`` (empty when the
  checkpoint predates the record). Without ``cfg.allow_resume_changes`` a difference is a one-line ConfigError
  naming the first differing field, checkpoint vs now."""
  saved = meta.get("run")
  if not isinstance(saved, dict):
    return []
  label = type(cfg).__name__
  now = json.loads(json.dumps(resume_record(cfg)))  # tuples as lists, as stored
  changed = []
  for name in RESUME_FIELDS:
    diff = _first_difference(saved.get(name, _MISSING), now[name], f"{label}.{name}")
    if diff is None:
      continue
    changed.append(name)
    if not cfg.allow_resume_changes:
      path, was, is_now = diff
      raise ConfigError(f"{where}: checkpoint step {step} was trained with {path}={was!r}, this run has "
                        f"{is_now!r}; a changed batch, sequence length or schedule would silently shift the LR and "
                        f"the data mixture. Set {label}.allow_resume_changes=True (--allow_resume_changes) to "
                        f"continue at the checkpoint's {meta.get('tokens_seen', '?')} tokens, or use another --workdir")
  return changed


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
  """The schedule phase (``PhasePlan``) that step ``step`` (0-based) belongs to; the last one past the end (the first
  one before the start of a resumed plan)."""
  if step < plan[0].start_step:
    return plan[0]
  for entry in plan:
    if entry.start_step <= step < entry.end_step:
      return entry
  return plan[-1]


def tokens_before_step(plan: list[Any], step: int) -> int:
  """Tokens the schedule has consumed before step ``step`` (0-based)."""
  entry = phase_for_step(plan, step)
  return entry.start_tokens + (step - entry.start_step) * entry.tokens_per_step


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
  cfg, label = run.cfg, type(run.cfg).__name__
  nproc = jax.process_count()
  if cfg.global_batch_size % nproc:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {nproc} processes")
  # Read-only pre-flight: bad input writes nothing.
  run.resume = read_resume_metadata(run, spec)
  try:
    spec.prepare(run)
  except RunError as e:
    raise ConfigError(str(e)) from None
  run.plan, run.total_steps = plan_run(cfg.schedule, cfg, run.model_cfg)
  if run.resume is not None:
    check_resume_changes(cfg, *run.resume, where=str(run.workdir))
    spec.check_metadata(run, *run.resume)
  try:
    run.mesh = make_mesh(**cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"{label}.mesh {cfg.mesh}: {' '.join(str(e).split())}") from None
  try:
    check_batch_split(cfg.global_batch_size, cfg.microbatches, run.mesh, DEFAULT_RULES,
                      what=f"{label}.global_batch_size")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    for seq_len in sorted({entry.seq_len for entry in run.plan if entry.num_steps}):
      check_attention_memory(run.model_cfg, cfg.global_batch_size // cfg.microbatches, seq_len)
  except ValueError as e:
    raise ConfigError(f"{label}: {e}") from None

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
