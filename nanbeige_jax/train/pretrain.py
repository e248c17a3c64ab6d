"""Pre-training: FG-WSD schedule + staged data mixture + the shared train core + the one checkpoint layer.

``run_pretrain(cfg, workdir)`` is what ``launch/pretrain.py`` calls. A run is a pure function of its config and
seed: the data iterator state, the optimizer state, the step and the non-finite counters are checkpointed together,
so a run restarted from its workdir (after a crash, a SIGKILL or a SIGTERM preemption) sees exactly the batches it
would have seen and its losses equal an uninterrupted run's bit for bit (on the same hardware and mesh).

This module is a spec of the stage template (``nanbeige_jax.train.stage.run_stage``): it supplies the data (native,
seqio or prepared shards: ``PretrainConfig.data_backend``), the per-step inputs (phase, mixture weights, tokens
seen, LR and RoPE base from the FG-WSD plan; a checkpoint at every phase end), the LM objective, the per-source
losses and the per-source evaluation. Fault handling (validation before writing, signals, resume with fallback, the
non-finite policy) is the template's: see docs/faults.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax import paths
from nanbeige_jax.config import ConfigError, as_dict, gin_dataclass
from nanbeige_jax.model import ModelConfig, get_preset
from nanbeige_jax.objectives.lm import eval_sums, make_lm_loss, per_source_losses
from nanbeige_jax.optim.optimizer import OptimizerConfig
from nanbeige_jax.train import stage
from nanbeige_jax.train.loop import StepInputs, TrainingStopped  # noqa: F401  (TrainingStopped: re-exported)
from nanbeige_jax.train.pretrain_data import (build_sources, check_prepared_tokenizer, data_iterator_class,
                                              eval_batches, load_configured_tokenizer, make_data_iterator,
                                              prepared_sources, train_tokenizer)

log = logging.getLogger("nanbeige_jax.pretrain")

DEFAULT_SOURCES = {
    "shakespeare": {"kind": "shakespeare"},
    "python_stdlib": {"kind": "python_stdlib"},
    "arithmetic": {"kind": "arithmetic"},
}
DATA_BACKENDS = ("native", "seqio", "prepared")


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class PretrainConfig(stage.RunConfig):
  """Everything a pre-training run needs. Bound from gin (``PretrainConfig.<field> = ...``); the shared run
  settings (schedule, optimizer, batch, logging/eval/checkpoint cadence, mesh, max_steps, non-finite limit) are
  ``stage.RunConfig``'s."""

  model_preset: str = "tiny"
  model_overrides: dict = dataclasses.field(default_factory=dict)
  sources: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SOURCES))
  tokenizer_path: str | None = None         # a sentencepiece model; None -> train one on the sources (workdir)
  tokenizer_vocab_size: int = 2048
  tokenizer_train_docs: int = 400           # documents per source sampled to train the default tokenizer
  z_loss_weight: float = 0.0
  skip_bad_lines: bool = False              # JSONL sources: skip and count malformed lines instead of failing
  data_root: str | None = None              # relative source `paths` are resolved against this directory
  data_backend: str = "native"              # native (MixtureIterator) | seqio (SeqioMixtureIterator, extra) |
                                            # prepared (PreparedMixtureIterator over launch/prepare_data.py shards)
  # data_backend='prepared': the prepare_data output_dir; source <name> of `sources` is read from
  # <prepared_root>/<name>/{train,eval} (the sources' own kind/paths are not read). Needs tokenizer_path (or a
  # workdir tokenizer.model): the tokenizer the data was prepared with.
  prepared_root: str | None = None
  plot: bool = True
  dry_run_topology: str = "v5p-8"           # the TPU slice `launch/pretrain.py --dry_run` compiles for (--topology)
  # Fault injection (tests, drills): 1-based steps whose batch gets NaN loss weights, so that step's loss and
  # gradients are non-finite and the non-finite policy runs for real. Applied on the host to the batch only; the
  # data stream and everything else are unchanged. Leave empty for real runs.
  fault_nonfinite_steps: tuple = ()

  def __post_init__(self):
    if self.schedule is None:
      raise ValueError("PretrainConfig.schedule is not set: bind it in gin, e.g. "
                       "PretrainConfig.schedule = @FGWSDSchedule() with a schedule file from configs/schedules/")
    stage.validate_run_config(self, extra_positive=("tokenizer_vocab_size",))
    if isinstance(self.fault_nonfinite_steps, (str, bytes)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.fault_nonfinite_steps):
      raise ValueError(f"PretrainConfig.fault_nonfinite_steps: expected a list of steps >= 1, found "
                       f"{self.fault_nonfinite_steps!r}")
    object.__setattr__(self, "fault_nonfinite_steps", tuple(self.fault_nonfinite_steps))
    if not isinstance(self.dry_run_topology, str) or not self.dry_run_topology:
      raise ValueError(f"PretrainConfig.dry_run_topology: expected a TPU slice name, found {self.dry_run_topology!r}")
    if self.data_backend not in DATA_BACKENDS:
      raise ValueError(f"PretrainConfig.data_backend: expected one of {DATA_BACKENDS}, found {self.data_backend!r}")
    if self.data_backend == "prepared" and not (isinstance(self.prepared_root, str) and self.prepared_root):
      raise ValueError(f"PretrainConfig.prepared_root: expected the prepare_data output directory when "
                       f"data_backend='prepared', found {self.prepared_root!r}")
    if self.data_backend != "prepared" and self.prepared_root is not None:
      raise ValueError(f"PretrainConfig.prepared_root is set ({self.prepared_root!r}) but data_backend is "
                       f"{self.data_backend!r}: set PretrainConfig.data_backend='prepared'")

  def model_config(self) -> ModelConfig:
    return get_preset(self.model_preset, **self.model_overrides)


# --- the spec --------------------------------------------------------------------------------------------------
class PretrainStage(stage.Stage):
  name = "pretrain"
  stage_description = "pre-training"
  accept_unstaged = True

  def prepare(self, run: stage.StageRun) -> None:
    cfg = run.cfg
    run.model_cfg = cfg.model_config()
    data_iterator_class(cfg)  # the backend is installed
    if cfg.data_backend == "prepared":
      self._prepare_prepared(run)
      return
    sources = run.extra["sources"] = build_sources(cfg)
    run.extra["names"] = sorted(sources)
    skipped = {n: int(s.skipped_lines) for n, s in sources.items() if getattr(s, "skip_bad_lines", False)}
    run.extra["skipped_lines"] = skipped
    for name, count in skipped.items():
      if count:
        log.warning("source %r: skipped %d malformed line(s) (skip_bad_lines)", name, count)
    run.tokenizer = load_configured_tokenizer(cfg, run.workdir)
    if run.tokenizer is not None:
      run.tokenizer.check_fits(run.model_cfg.vocab_size)
    elif cfg.tokenizer_vocab_size > run.model_cfg.vocab_size:
      raise ConfigError(f"PretrainConfig.tokenizer_vocab_size {cfg.tokenizer_vocab_size} exceeds the model's "
                        f"vocab_size {run.model_cfg.vocab_size}")

  def _prepare_prepared(self, run: stage.StageRun) -> None:
    """Pre-flight of ``data_backend='prepared'``: only the indexes are read (no raw source is loaded: every
    process would otherwise read all of them), and the tokenizer must be the one the shards were prepared with."""
    cfg = run.cfg
    names = run.extra["names"] = sorted(cfg.sources)
    run.extra["skipped_lines"] = {}
    run.extra["sources"] = prepared_sources(cfg, names, "train")
    run.extra["eval_sources"] = prepared_sources(cfg, names, "eval") if cfg.eval_batches else {}
    run.tokenizer = load_configured_tokenizer(cfg, run.workdir)
    if run.tokenizer is None:
      raise ConfigError("PretrainConfig.tokenizer_path: data_backend='prepared' needs the tokenizer the data was "
                        "prepared with (--tokenizer); none is set and the workdir has no tokenizer.model")
    run.tokenizer.check_fits(run.model_cfg.vocab_size)
    check_prepared_tokenizer({**run.extra["sources"], **run.extra["eval_sources"]}, run.tokenizer)

  def write_workdir(self, run: stage.StageRun) -> None:
    if run.cfg.data_backend == "prepared" and run.cfg.tokenizer_path and jax.process_index() == 0:
      # the next stage and launch/eval.py read <workdir>/tokenizer.model
      target = paths.join(run.workdir, "tokenizer.model")
      if not paths.same_path(run.tokenizer.source, target):
        paths.copy(run.tokenizer.source, target)
    if run.tokenizer is None:
      run.tokenizer = train_tokenizer(run.cfg, run.extra["sources"], run.workdir)
      run.tokenizer.check_fits(run.model_cfg.vocab_size)

  def objective(self, run: stage.StageRun):
    return make_lm_loss(num_sources=len(run.extra["names"]), z_loss_weight=run.cfg.z_loss_weight,
                        vocab_chunk=run.cfg.vocab_chunk)

  def build_data(self, run: stage.StageRun):
    return make_data_iterator(run.cfg, run.extra["sources"], run.tokenizer, run.extra["names"])

  def metadata(self, run: stage.StageRun) -> dict:
    cfg = run.cfg
    return ckpt_lib.build_metadata(run.model_cfg, stage="pretrain", tokenizer_fingerprint=run.tokenizer.fingerprint(),
                                   extra={"schedule": as_dict(cfg.schedule),
                                          "optimizer": as_dict(cfg.optimizer or OptimizerConfig()),
                                          "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                                          "sources": cfg.sources})

  def next_inputs(self, run: stage.StageRun, step: int, state: Any) -> StepInputs:
    entry = stage.phase_for_step(run.plan, step)
    batch = run.phase_batch(entry, lambda: run.data.next_batch(entry.phase.normalized_mixture(), entry.seq_len))
    if step + 1 in run.cfg.fault_nonfinite_steps:  # fault injection (PretrainConfig.fault_nonfinite_steps)
      batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
    return run.schedule_inputs(step, batch, tokens=entry.tokens_per_step)

  def log_fields(self, run: stage.StageRun, step: int, host: dict[str, Any], inputs: StepInputs) -> dict[str, Any]:
    return per_source_losses(host["sums"], run.extra["names"], prefix="loss/")

  def evaluate(self, run: stage.StageRun, step: int, state: Any) -> dict[str, Any]:
    names = run.extra["names"]
    sources = run.extra["eval_sources"] if run.cfg.data_backend == "prepared" else run.extra["sources"]
    batches = eval_batches(run.cfg, run.data, sources, run.tokenizer, names)
    loss_sum, weight_sum, sums = eval_sums(run.trainer, state.params, batches, run.rope_theta(step - 1),
                                                 len(names))
    row = {"tokens_seen": stage.tokens_before_step(run.plan, step)}
    if weight_sum > 0:
      row["eval/loss"] = loss_sum / weight_sum
    row.update(per_source_losses(sums, names, prefix="eval/loss/"))
    return row

  def summary(self, run: stage.StageRun, summary: dict[str, Any]) -> dict[str, Any]:
    if run.extra["skipped_lines"]:
      summary["skipped_bad_lines"] = run.extra["skipped_lines"]
    return summary


def run_pretrain(cfg: PretrainConfig, workdir: str | os.PathLike, *, fresh: bool = False,
                 operative_config: str | None = None, sharding_report: bool = False) -> dict[str, Any]:
  """Train (or resume) in ``workdir`` (``stage.run_stage`` with ``PretrainStage``); returns the summary."""
  return stage.run_stage(cfg, workdir, PretrainStage(), fresh=fresh, operative_config=operative_config,
                         sharding_report=sharding_report)
