"""Pre-training: FG-WSD schedule + staged data mixture + the shared train core + the one checkpoint layer.

``run_pretrain(cfg, workdir)`` is what ``launch/pretrain.py`` calls. A run is a pure function of its config and
seed: the data iterator state, the optimizer state, the step and the non-finite counters are checkpointed together,
so a run restarted from its workdir (after a crash, a SIGKILL or a SIGTERM preemption) sees exactly the batches it
would have seen and its losses equal an uninterrupted run's bit for bit (on the same hardware and mesh).

This module is a spec of the stage template (``nanbeige_jax.train.stage.run_stage``): it supplies the data (native or
seqio: ``PretrainConfig.data_backend``), the per-step inputs (phase, mixture weights, tokens seen, LR and RoPE base
from the FG-WSD plan; a checkpoint at every phase end), the LM objective, the per-source losses and the per-source
evaluation. Fault handling is the template's (see docs/faults.md):
* everything checkable is validated before the workdir is touched (config, mesh, sources, tokenizer/model
  vocabulary, an existing checkpoint's stage, model and tokenizer), so bad input writes nothing;
* SIGTERM/SIGINT (and the multi-host preemption sync point) finish the current step, checkpoint and return;
  a second signal kills the process at once;
* resume restores the newest checkpoint that restores completely, moving corrupt newer ones aside
  (``nanbeige_jax.train.resume``); keep-last-N pruning never deletes the newest verified checkpoint; metric rows
  logged after the restored step by the interrupted run are dropped;
* non-finite steps are skipped by the train core and counted; ``max_consecutive_nonfinite`` in a row stop the run.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.config import ConfigError, as_dict, gin_dataclass
from nanbeige_jax.data.mixture import MixtureIterator
from nanbeige_jax.data.sources import build_source
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.model import ModelConfig, get_preset
from nanbeige_jax.objectives.lm import make_lm_loss
from nanbeige_jax.optim.optimizer import OptimizerConfig
from nanbeige_jax.train import stage
from nanbeige_jax.train.loop import StepInputs, TrainingStopped  # noqa: F401  (TrainingStopped: re-exported)

log = logging.getLogger("nanbeige_jax.pretrain")

DEFAULT_SOURCES = {
    "shakespeare": {"kind": "shakespeare"},
    "python_stdlib": {"kind": "python_stdlib"},
    "arithmetic": {"kind": "arithmetic"},
}
DATA_BACKENDS = ("native", "seqio")


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
  data_backend: str = "native"              # native (MixtureIterator) | seqio (SeqioMixtureIterator, extra)
  plot: bool = True
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
    if self.data_backend not in DATA_BACKENDS:
      raise ValueError(f"PretrainConfig.data_backend: expected one of {DATA_BACKENDS}, found {self.data_backend!r}")

  def model_config(self) -> ModelConfig:
    return get_preset(self.model_preset, **self.model_overrides)


# --- set-up helpers ----------------------------------------------------------------------------------------------
def build_sources(cfg: PretrainConfig) -> dict[str, Any]:
  out = {}
  for name, spec in cfg.sources.items():
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    if cfg.data_root and "paths" in kwargs:
      paths = [kwargs["paths"]] if isinstance(kwargs["paths"], str) else list(kwargs["paths"])
      kwargs["paths"] = [p if os.path.isabs(p) else os.path.join(cfg.data_root, p) for p in paths]
    if spec["kind"] == "jsonl" and cfg.skip_bad_lines:
      kwargs.setdefault("skip_bad_lines", True)
    out[name] = build_source(spec["kind"], name, **kwargs)
    out[name].validate()
  return out


def load_configured_tokenizer(cfg: PretrainConfig, workdir: pathlib.Path) -> Tokenizer | None:
  """The tokenizer named by the config or already in the workdir (read-only); None when one must be trained."""
  if cfg.tokenizer_path:
    return Tokenizer.load(cfg.tokenizer_path)
  path = workdir / "tokenizer.model"
  return Tokenizer.load(path) if path.exists() else None


def train_tokenizer(cfg: PretrainConfig, sources: dict[str, Any], workdir: pathlib.Path) -> Tokenizer:
  """Train the default tokenizer on the sources into ``<workdir>/tokenizer.model`` (written atomically)."""
  path = workdir / "tokenizer.model"
  texts: list[str] = []
  for name in sorted(sources):
    docs = sources[name].split_documents("train")
    step = max(1, len(docs) // cfg.tokenizer_train_docs)
    texts.extend(d[:20000] for d in docs[::step][: cfg.tokenizer_train_docs])
  tmp = workdir / f".tokenizer.tmp.{os.getpid()}"
  tok = Tokenizer.train(texts, tmp, cfg.tokenizer_vocab_size)
  os.replace(f"{tmp}.model", path)
  if os.path.exists(f"{tmp}.vocab"):
    os.replace(f"{tmp}.vocab", workdir / "tokenizer.vocab")
  log.info("trained a %d-piece tokenizer on %d documents -> %s", tok.vocab_size, len(texts), path)
  return Tokenizer.load(path)


def data_iterator_class(cfg: PretrainConfig) -> type:
  """``MixtureIterator`` or, for ``data_backend='seqio'``, ``SeqioMixtureIterator`` (ConfigError without seqio)."""
  if cfg.data_backend != "seqio":
    return MixtureIterator
  try:
    import seqio  # noqa: F401
    from nanbeige_jax.data.seqio_feed import SeqioMixtureIterator
  except ImportError:
    raise ConfigError("PretrainConfig.data_backend='seqio' needs the seqio extra: pip install -e '.[seqio]'") from None
  return SeqioMixtureIterator


def make_data_iterator(cfg: PretrainConfig, sources: dict[str, Any], tokenizer: Tokenizer, names: list[str]) -> Any:
  """The training batch stream of ``cfg.data_backend`` (both backends have the same interface and state)."""
  per_process = cfg.global_batch_size // jax.process_count()
  iterator_cls = data_iterator_class(cfg)
  return iterator_cls({n: sources[n] for n in names}, tokenizer, batch_size=per_process, seed=cfg.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(), split="train")


def eval_batches(cfg: PretrainConfig, data: Any, sources: dict[str, Any], tokenizer: Tokenizer,
                 names: list[str]) -> Any:
  """The held-out batches of one evaluation (the same every time). seqio: one pass over each task's validation
  split, at most ``eval_batches`` batches per source (``SeqioMixtureIterator.eval_batches``). native:
  ``eval_batches`` batches of the sources' eval splits under a uniform mixture (a fresh eval-split iterator)."""
  if cfg.data_backend == "seqio":
    return (batch for name in names for batch in data.eval_batches(name, cfg.seq_len, max_batches=cfg.eval_batches))
  it = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=data.batch_size, seed=cfg.seed + 1,
                       process_index=jax.process_index(), process_count=jax.process_count(), split="eval")
  uniform = {n: 1.0 for n in names}
  return (it.next_batch(uniform, cfg.seq_len) for _ in range(cfg.eval_batches))


# --- the spec --------------------------------------------------------------------------------------------------
class PretrainStage(stage.Stage):
  name = "pretrain"
  stage_description = "pre-training"
  accept_unstaged = True

  def prepare(self, run: stage.StageRun) -> None:
    cfg = run.cfg
    run.model_cfg = cfg.model_config()
    data_iterator_class(cfg)  # the backend is installed
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

  def write_workdir(self, run: stage.StageRun) -> None:
    if run.tokenizer is None:
      run.tokenizer = train_tokenizer(run.cfg, run.extra["sources"], run.workdir)
      run.tokenizer.check_fits(run.model_cfg.vocab_size)

  def objective(self, run: stage.StageRun):
    return make_lm_loss(num_sources=len(run.extra["names"]), z_loss_weight=run.cfg.z_loss_weight,
                        vocab_chunk=run.cfg.vocab_chunk)

  def build_data(self, run: stage.StageRun):
    run.extra["tokens_after"] = 0  # tokens seen after the last step whose batch was drawn (checkpointed)
    return make_data_iterator(run.cfg, run.extra["sources"], run.tokenizer, run.extra["names"])

  def metadata(self, run: stage.StageRun) -> dict:
    cfg = run.cfg
    return ckpt_lib.build_metadata(run.model_cfg, stage="pretrain", tokenizer_fingerprint=run.tokenizer.fingerprint(),
                                   extra={"schedule": as_dict(cfg.schedule),
                                          "optimizer": as_dict(cfg.optimizer or OptimizerConfig()),
                                          "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                                          "sources": cfg.sources})

  def data_state(self, run: stage.StageRun) -> dict:
    return {"iterator": run.data.get_state(), "tokens_seen": int(run.extra["tokens_after"])}

  def next_inputs(self, run: stage.StageRun, step: int, state: Any) -> StepInputs:
    entry = stage.phase_for_step(run.plan, step)
    batch = run.data.next_batch(entry.phase.normalized_mixture(), entry.seq_len)
    if step + 1 in run.cfg.fault_nonfinite_steps:  # fault injection (PretrainConfig.fault_nonfinite_steps)
      batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
    inputs = run.schedule_inputs(step, batch, tokens=entry.tokens_per_step)
    run.extra["tokens_after"] = inputs.fields["tokens_seen"]
    return inputs

  def log_fields(self, run: stage.StageRun, step: int, host: dict[str, Any], inputs: StepInputs) -> dict[str, Any]:
    return stage.per_source_losses(host["sums"], run.extra["names"], prefix="loss/")

  def evaluate(self, run: stage.StageRun, step: int, state: Any) -> dict[str, Any]:
    names = run.extra["names"]
    batches = eval_batches(run.cfg, run.data, run.extra["sources"], run.tokenizer, names)
    loss_sum, weight_sum, sums = stage.eval_sums(run.trainer, state.params, batches, run.rope_theta(step - 1),
                                                 len(names))
    row = {"tokens_seen": stage.tokens_before_step(run.plan, step)}
    if weight_sum > 0:
      row["eval/loss"] = loss_sum / weight_sum
    row.update(stage.per_source_losses(sums, names, prefix="eval/loss/"))
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
