"""Pre-training: FG-WSD schedule + staged data mixture + the shared train core + the one checkpoint layer.

``run_pretrain(cfg, workdir)`` is what ``launch/pretrain.py`` calls. A run is a pure function of its config and
seed: the data iterator state, the optimizer state, the step and the non-finite counters are checkpointed together,
so a run restarted from its workdir (after a crash, a SIGKILL or a SIGTERM preemption) sees exactly the batches it
would have seen and its losses equal an uninterrupted run's bit for bit (on the same hardware and mesh).

The run is the shared outer loop (``nanbeige_jax.train.runner.train_loop``): this module supplies the per-step
inputs (phase, mixture weights, tokens seen, LR and RoPE base from the FG-WSD plan; a checkpoint at every phase
end), the per-source losses and the per-source evaluation (``eval_batches`` of the data iterator, native or seqio:
``PretrainConfig.data_backend``). Fault handling is the runner's (see docs/faults.md):
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
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.optim.schedules import FGWSDSchedule
from nanbeige_jax.sharding import DEFAULT_RULES, make_mesh
from nanbeige_jax.train import resume, runner
from nanbeige_jax.train.lm import make_lm_loss
from nanbeige_jax.train.loop import Trainer
from nanbeige_jax.train.runner import TrainingStopped  # noqa: F401  (re-exported: launch/pretrain.py)

log = logging.getLogger("nanbeige_jax.pretrain")

DEFAULT_SOURCES = {
    "shakespeare": {"kind": "shakespeare"},
    "python_stdlib": {"kind": "python_stdlib"},
    "arithmetic": {"kind": "arithmetic"},
}
DATA_BACKENDS = ("native", "seqio")


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class PretrainConfig(runner.RunConfig):
  """Everything a pre-training run needs. Bound from gin (``PretrainConfig.<field> = ...``); the shared run
  settings (schedule, optimizer, batch, logging/eval/checkpoint cadence, mesh, max_steps, non-finite limit) are
  ``runner.RunConfig``'s."""

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
    runner.validate_run_config(self, extra_positive=("tokenizer_vocab_size",))
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


# --- the run -------------------------------------------------------------------------------------------------------
def run_pretrain(cfg: PretrainConfig, workdir: str | os.PathLike, *, fresh: bool = False,
                 operative_config: str | None = None, sharding_report: bool = False) -> dict[str, Any]:
  """Train (or resume) in ``workdir``. Returns a summary dict (also written to ``<workdir>/summary.json``).

  Raises ConfigError (one line, nothing written) on bad input, ``resume.ResumeError`` (a ConfigError) when the
  workdir cannot be resumed, and TrainingStopped after too many consecutive non-finite steps. SIGTERM/SIGINT
  during the call (set-up included) make it checkpoint after the current step and return normally.
  ``sharding_report``: print the resolved sharding to stderr (process 0) once the trainer is built.
  """
  with runner.StopSignal() as stop:
    return _run(cfg, pathlib.Path(workdir), fresh, operative_config, stop, sharding_report)


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


def _run(cfg: PretrainConfig, workdir: pathlib.Path, fresh: bool, operative_config: str | None,
         stop: runner.StopSignal, sharding_report: bool) -> dict[str, Any]:
  model_cfg = cfg.model_config()
  schedule: FGWSDSchedule = cfg.schedule
  opt_cfg = cfg.optimizer or OptimizerConfig()
  # Validate everything checkable before touching the workdir or compiling anything: bad input writes nothing.
  plan, total_steps = runner.plan_run(schedule, cfg, model_cfg)
  nproc = jax.process_count()
  if cfg.global_batch_size % nproc:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {nproc} processes")
  try:
    mesh = make_mesh(**cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"PretrainConfig.mesh {cfg.mesh}: {' '.join(str(e).split())}") from None
  data_iterator_class(cfg)  # the backend is installed
  sources = build_sources(cfg)
  skipped_lines = {n: int(s.skipped_lines) for n, s in sources.items() if getattr(s, "skip_bad_lines", False)}
  for name, count in skipped_lines.items():
    if count:
      log.warning("source %r: skipped %d malformed line(s) (skip_bad_lines)", name, count)
  tokenizer = load_configured_tokenizer(cfg, workdir)
  if tokenizer is not None:
    tokenizer.check_fits(model_cfg.vocab_size)
  elif cfg.tokenizer_vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"PretrainConfig.tokenizer_vocab_size {cfg.tokenizer_vocab_size} exceeds the model's "
                      f"vocab_size {model_cfg.vocab_size}")
  ckpt_dir = workdir / "checkpoints"

  def check_metadata(step: int, meta: dict) -> None:
    runner.check_checkpoint_metadata(workdir, step, meta, stage="pretrain", model_cfg=model_cfg,
                                     tokenizer=tokenizer, accept_unstaged=True, stage_description="pre-training")
  if not fresh:
    resume.check_workdir(ckpt_dir, check_metadata)

  # From here on the workdir is written.
  if fresh:
    runner.move_run_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is None:
    tokenizer = train_tokenizer(cfg, sources, workdir)
    tokenizer.check_fits(model_cfg.vocab_size)

  tx = make_optimizer(opt_cfg)
  names = sorted(sources)
  loss_fn = make_lm_loss(num_sources=len(names), z_loss_weight=cfg.z_loss_weight, vocab_chunk=cfg.vocab_chunk)
  trainer = Trainer(model_cfg, tx, loss_fn, mesh=mesh, rules=DEFAULT_RULES, microbatches=cfg.microbatches)
  if sharding_report:
    runner.print_sharding_report(trainer)
  data = make_data_iterator(cfg, sources, tokenizer, names)

  metadata = ckpt_lib.build_metadata(model_cfg, stage="pretrain", tokenizer_fingerprint=tokenizer.fingerprint(),
                                     extra={"schedule": as_dict(schedule), "optimizer": as_dict(opt_cfg),
                                            "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                                            "sources": cfg.sources})
  tokens_after = [0]  # tokens seen after the last step whose batch was drawn (checkpointed with the data state)
  checkpointer = runner.Checkpointer(
      ckpt_dir, metadata=metadata, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpointing,
      data_state_fn=lambda: {"iterator": data.get_state(), "tokens_seen": int(tokens_after[0])},
      check_metadata=check_metadata)
  try:
    state, start_step, data_state = runner.resume_or_init(trainer, checkpointer, workdir,
                                                          lambda: trainer.init_state(cfg.seed))
    if data_state is not None:
      data.set_state(data_state["iterator"])
    if operative_config and jax.process_index() == 0:
      (workdir / "operative_config.gin").write_text(operative_config)
    fault_steps = set(cfg.fault_nonfinite_steps)

    def next_inputs(step: int) -> runner.StepInputs:
      entry = runner.phase_for_step(plan, step)
      tokens_seen = runner.tokens_before_step(plan, step)
      weights = entry.phase.normalized_mixture()
      batch = data.next_batch(weights, entry.seq_len)
      if step + 1 in fault_steps:  # fault injection (PretrainConfig.fault_nonfinite_steps)
        batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
      tokens_after[0] = tokens_seen + entry.tokens_per_step
      fields = {"phase": entry.phase.name, "phase_index": entry.index, "tokens_seen": tokens_after[0]}
      fields.update({f"mixture/{n}": weights.get(n, 0.0) for n in names})
      return runner.StepInputs(batch=batch, lr=schedule.lr_host(tokens_seen),
                               rope_theta=entry.phase.rope_theta or model_cfg.rope_theta,
                               tokens=entry.tokens_per_step, seq_len=entry.seq_len, fields=fields,
                               boundary=step + 1 == entry.end_step)

    def log_fields(step: int, host: dict[str, Any], inputs: runner.StepInputs) -> dict[str, Any]:
      del step, inputs
      return runner.per_source_losses(host["sums"], names, prefix="loss/")

    def evaluate(step: int, state: Any) -> dict[str, Any]:
      entry = runner.phase_for_step(plan, step - 1)
      theta = entry.phase.rope_theta or model_cfg.rope_theta
      batches = eval_batches(cfg, data, sources, tokenizer, names)
      loss_sum, weight_sum, sums = runner.eval_sums(trainer, state.params, batches, theta, len(names))
      row = {"tokens_seen": runner.tokens_before_step(plan, step)}
      if weight_sum > 0:
        row["eval/loss"] = loss_sum / weight_sum
      row.update(runner.per_source_losses(sums, names, prefix="eval/loss/"))
      return row

    result = runner.run_loop(cfg, trainer, state, workdir=workdir, start_step=start_step, total_steps=total_steps,
                             next_inputs=next_inputs, checkpointer=checkpointer, stop=stop,
                             evaluate=evaluate, log_fields=log_fields)
  finally:
    checkpointer.close()
  summary = runner.run_summary(result, checkpointer, start_step=start_step, total_steps=total_steps,
                               workdir=workdir)
  if skipped_lines:
    summary["skipped_bad_lines"] = skipped_lines
  runner.write_summary(workdir, summary)
  if jax.process_index() == 0 and cfg.plot and result.stop_reason is None:
    from nanbeige_jax.plot import plot_run
    summary["plot"] = plot_run(str(workdir / runner.METRICS_FILE), str(workdir / "run.png"))
  runner.raise_if_stopped(result)
  return summary
