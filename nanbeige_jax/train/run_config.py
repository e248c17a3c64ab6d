"""What a run is configured as and how its steps are planned: ``RunConfig`` (every field the stage template reads)
and its validation, the schedule plan of a run (``plan_run``, ``phase_for_step``, ``tokens_before_step``), and the
resume record that a restart must agree with (``resume_record``, ``check_resume_changes``)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from nanbeige_jax.config import ConfigError, as_dict, check_keys
from nanbeige_jax.optim.optimizer import OptimizerConfig
from nanbeige_jax.optim.schedules import FGWSDSchedule, plan_steps

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
    if entry.rows % cfg.global_batch_size:
      raise ConfigError(f"phase {entry.phase.name!r}: global_batch_size {entry.rows} is not a multiple of "
                        f"{type(cfg).__name__}.global_batch_size {cfg.global_batch_size} (the rows one data draw "
                        f"yields; a phase's batch is whole draws)")
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
