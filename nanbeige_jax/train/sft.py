"""Supervised fine-tuning: chat data, loss on assistant tokens only, multi-stage hand-off through checkpoints.

``run_sft(cfg, workdir)`` is what ``launch/sft.py`` calls. A stage starts from the parameters of any checkpoint of
this project (params only, fresh optimizer: the stage hand-off; ``SFTConfig.init_from``) or of a Hugging Face
directory (``init_hf``) and trains on a per-domain mixture of chat sources (``nanbeige_jax.data.sft_data``) under
an ``FGWSDSchedule`` (for SFT: warmup + one stable phase carrying the stage's mixture + decay; the schedule counts
row tokens, ``global_batch_size * seq_len`` per step). Conversations are rendered with the Nanbeige chat template
and packed with segment ids (no attention across conversations); the loss weights are the assistant mask, and the
train core divides the summed loss by the number of assistant tokens in the whole global batch, so gradient
accumulation and data parallelism do not change the update.

The tokenizer is the init run's (``<init workdir>/tokenizer.model``, or ``tokenizer.model`` in the HF directory,
or ``tokenizer_path``); its fingerprint must match the one the init checkpoint recorded. The run copies it to
``<workdir>/tokenizer.model`` so the next stage and ``launch/eval.py`` find it. A workdir that already holds
checkpoints of this stage is resumed exactly (parameters, optimizer, data position) instead.

Checkpoint metadata: ``stage`` (e.g. ``sft_cold_start``), the tokenizer fingerprint, and in ``extra`` the init
source, the SFT sources, the schedule and, inherited from the init checkpoint, the pre-training ``sources`` (what
``launch/eval.py`` measures perplexity on).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
from typing import Any

import jax

from nanbeige_jax.config import ConfigError, as_dict, gin_dataclass
from nanbeige_jax.data import chat_template
from nanbeige_jax.data.sft_data import OVERLONG_POLICIES, SFTMixtureIterator, build_chat_source
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.model import ModelConfig
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.optim.schedules import FGWSDSchedule
from nanbeige_jax.sharding import DEFAULT_RULES, make_mesh
from nanbeige_jax.train import resume, runner
from nanbeige_jax.train.lm import make_lm_loss
from nanbeige_jax.train.loop import Trainer

log = logging.getLogger("nanbeige_jax.sft")

COMPILE_TIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "max_position_embeddings")
CHAT_SPECIALS = (chat_template.IM_START, chat_template.IM_END, chat_template.THINK_START, chat_template.THINK_END)


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class SFTConfig(runner.RunConfig):
  """Everything an SFT stage needs. Bound from gin (``SFTConfig.<field> = ...``); the shared run settings
  (schedule, optimizer, batch, logging/eval/checkpoint cadence, mesh, max_steps, non-finite limit) are
  ``runner.RunConfig``'s."""

  stage: str = "sft"                        # checkpoint metadata stage name (e.g. sft_cold_start, sft_overall)
  init_from: str | None = None              # a run workdir (holding checkpoints/) or a checkpoint directory
  init_step: int | None = None              # None: the latest step of init_from
  init_hf: str | None = None                # a Hugging Face Llama directory instead of init_from
  model_overrides: dict = dataclasses.field(default_factory=dict)  # compile-time fields only (dtype, remat...)
  tokenizer_path: str | None = None         # None: <init workdir>/tokenizer.model (or the HF dir's)
  sources: dict = dataclasses.field(default_factory=dict)  # name -> {kind: jsonl|arithmetic, ...}
  seq_len: int = 512                        # packed row length, for phases that do not set their own
  overlong: str = "truncate"                # conversations longer than seq_len: truncate | drop
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 2

  def __post_init__(self):
    if not isinstance(self.stage, str) or not self.stage:
      raise ValueError(f"SFTConfig.stage: expected a non-empty string, found {self.stage!r}")
    if self.schedule is None:
      raise ValueError("SFTConfig.schedule is not set: bind it in gin, e.g. SFTConfig.schedule = @FGWSDSchedule()")
    runner.validate_run_config(self, extra_positive=("vocab_chunk",), sources_hint="jsonl|arithmetic")
    if self.init_from is not None and self.init_hf is not None:
      raise ValueError("SFTConfig: init_from and init_hf are mutually exclusive; set one")
    if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
      raise ValueError(f"SFTConfig.eval_batches: expected an int >= 0, found {self.eval_batches!r}")
    if self.init_step is not None and (isinstance(self.init_step, bool) or not isinstance(self.init_step, int)
                                       or self.init_step < 0):
      raise ValueError(f"SFTConfig.init_step: expected a non-negative int or None, found {self.init_step!r}")
    if self.overlong not in OVERLONG_POLICIES:
      raise ValueError(f"SFTConfig.overlong: expected one of {OVERLONG_POLICIES}, found {self.overlong!r}")
    bad = sorted(set(self.model_overrides) - set(COMPILE_TIME_FIELDS))
    if bad:
      raise ValueError(f"SFTConfig.model_overrides: {bad} cannot change at fine-tuning time (the architecture comes "
                       f"from the init checkpoint); allowed: {list(COMPILE_TIME_FIELDS)}")


# --- set-up ----------------------------------------------------------------------------------------------------
def resolve_init_dirs(init_from: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
  """(checkpoint directory, run workdir) of ``init_from``, which names either a run workdir or its checkpoints."""
  path = pathlib.Path(init_from)
  if not path.is_dir():
    raise ConfigError(f"SFTConfig.init_from: {str(path)!r} does not exist (run launch/pretrain.py first, or point "
                      f"it at a run directory or a checkpoint directory of this project)")
  if (path / "checkpoints").is_dir():
    return path / "checkpoints", path
  return path, path.parent


def load_tokenizer(cfg: SFTConfig, workdir: pathlib.Path, resuming: bool) -> Tokenizer:
  if cfg.tokenizer_path:
    path = pathlib.Path(cfg.tokenizer_path)
  elif resuming and (workdir / "tokenizer.model").is_file():
    path = workdir / "tokenizer.model"
  elif cfg.init_from is not None:
    path = resolve_init_dirs(cfg.init_from)[1] / "tokenizer.model"
  elif cfg.init_hf is not None:
    path = pathlib.Path(cfg.init_hf) / "tokenizer.model"
  else:
    raise ConfigError("no tokenizer: set SFTConfig.tokenizer_path (or init from a run that has one)")
  if not path.is_file():
    raise ConfigError(f"tokenizer {str(path)!r} does not exist; set SFTConfig.tokenizer_path (--tokenizer)")
  tokenizer = Tokenizer.load(path)
  missing = [p for p in CHAT_SPECIALS if p not in tokenizer.special_ids]
  if missing:
    raise ConfigError(f"tokenizer {str(path)!r} lacks the chat-template special token(s) {missing}; SFT needs "
                      f"{list(CHAT_SPECIALS)} as atomic pieces")
  return tokenizer


def _model_config_from(metadata: dict, where: str, overrides: dict) -> ModelConfig:
  if "model_config" not in metadata:
    raise ConfigError(f"{where}: checkpoint metadata has no model_config")
  cfg = ModelConfig.from_dict(metadata["model_config"])
  return cfg.replace(**overrides) if overrides else cfg


def _read_metadata(ckpt_dir: pathlib.Path, step: int | None) -> tuple[dict, int]:
  from nanbeige_jax.checkpoint import CheckpointError, CheckpointManager
  try:
    manager = CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False, create=False)
    try:
      step = manager.latest_step() if step is None else step
      if step is None:
        raise ConfigError(f"{ckpt_dir}: no committed checkpoint")
      return manager.read_metadata(step), step
    finally:
      manager.close()
  except CheckpointError as e:
    raise ConfigError(str(e)) from None


# --- the run ---------------------------------------------------------------------------------------------------
def run_sft(cfg: SFTConfig, workdir: str | os.PathLike, *, fresh: bool = False,
            operative_config: str | None = None, sharding_report: bool = False) -> dict[str, Any]:
  """Train (or resume) an SFT stage in ``workdir``; returns a summary (also ``<workdir>/summary.json``).

  The fault handling of ``nanbeige_jax.train.runner`` applies as for pre-training: bad input writes nothing,
  SIGTERM/SIGINT from set-up on checkpoint and return, resume falls back past corrupt checkpoints, pruning keeps
  the newest verified one, metric rows after the restored step are dropped, TrainingStopped on the non-finite
  policy. ``sharding_report``: print the resolved sharding to stderr (process 0) once the trainer is built.
  """
  with runner.StopSignal() as stop:
    return _run(cfg, pathlib.Path(workdir), fresh, operative_config, stop, sharding_report)


def _run(cfg: SFTConfig, workdir: pathlib.Path, fresh: bool, operative_config: str | None,
         stop: runner.StopSignal, sharding_report: bool) -> dict[str, Any]:
  schedule: FGWSDSchedule = cfg.schedule
  opt_cfg = cfg.optimizer or OptimizerConfig()
  nproc = jax.process_count()
  if cfg.global_batch_size % nproc:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {nproc} processes")
  sources = {name: build_chat_source(name, spec) for name, spec in cfg.sources.items()}
  names = list(sources)
  ckpt_dir = workdir / "checkpoints"
  resume_meta = None
  if not fresh:  # read-only: the newest checkpoint with readable metadata must be this stage's
    found: dict[str, Any] = {}

    def capture(step: int, meta: dict) -> None:
      runner.check_checkpoint_metadata(workdir, step, meta, stage=cfg.stage,
                                       model_cfg=_model_config_from(meta, str(ckpt_dir), cfg.model_overrides),
                                       tokenizer=None)
      found["meta"], found["step"] = meta, step
    resume.check_workdir(ckpt_dir, capture)
    resume_meta = found.get("meta")
  # Model config and init source (everything cheap is checked before compiling).
  init_meta: dict[str, Any] = {}
  init_ckpt = None
  if resume_meta is not None:
    model_cfg = _model_config_from(resume_meta, str(ckpt_dir), cfg.model_overrides)
    extra = resume_meta.get("extra") or {}
    init_meta = {**(extra.get("init") or {}), "sources": extra.get("sources")}
  elif cfg.init_from is not None:
    init_ckpt, _ = resolve_init_dirs(cfg.init_from)
    source_meta, source_step = _read_metadata(init_ckpt, cfg.init_step)
    model_cfg = _model_config_from(source_meta, str(init_ckpt), cfg.model_overrides)
    init_meta = {"from": str(init_ckpt), "step": source_step, "stage": source_meta.get("stage"),
                 "sources": (source_meta.get("extra") or {}).get("sources")}
  elif cfg.init_hf is not None:
    from nanbeige_jax.hf import model_config_from_hf, read_hf_config
    model_cfg = model_config_from_hf(read_hf_config(cfg.init_hf), **cfg.model_overrides)
    init_meta = {"from": str(cfg.init_hf), "stage": "hf", "sources": None}
    source_meta = {}
  else:
    raise ConfigError("SFT starts from trained parameters: set SFTConfig.init_from (--init_from, a run or "
                      "checkpoint directory of this project) or SFTConfig.init_hf (--init_hf)")
  plan, total_steps = runner.plan_run(schedule, cfg, model_cfg)
  tokenizer = load_tokenizer(cfg, workdir, resuming=resume_meta is not None)
  tokenizer.check_fits(model_cfg.vocab_size)
  if resume_meta is None and init_ckpt is not None:
    stored = source_meta.get("tokenizer_fingerprint")
    if stored is not None and stored != tokenizer.fingerprint():
      raise ConfigError(f"{init_ckpt}: the init checkpoint was trained with tokenizer {stored}, but "
                        f"{tokenizer.source} has fingerprint {tokenizer.fingerprint()}")

  def check_metadata(step: int, meta: dict) -> None:
    runner.check_checkpoint_metadata(workdir, step, meta, stage=cfg.stage, model_cfg=model_cfg, tokenizer=tokenizer)
  if resume_meta is not None:
    check_metadata(found["step"], resume_meta)  # the tokenizer too, now that it is known
  try:
    mesh = make_mesh(**cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"SFTConfig.mesh {cfg.mesh}: {' '.join(str(e).split())}") from None

  # From here on the workdir is written.
  if fresh:
    runner.move_run_aside(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tok_copy = workdir / "tokenizer.model"
  if jax.process_index() == 0 and pathlib.Path(tokenizer.source).resolve() != tok_copy.resolve():
    shutil.copyfile(tokenizer.source, f"{tok_copy}.tmp.{os.getpid()}")
    os.replace(f"{tok_copy}.tmp.{os.getpid()}", tok_copy)
  if operative_config and jax.process_index() == 0:
    (workdir / "operative_config.gin").write_text(operative_config)

  tx = make_optimizer(opt_cfg)
  loss_fn = make_lm_loss(num_sources=len(names), vocab_chunk=cfg.vocab_chunk)
  trainer = Trainer(model_cfg, tx, loss_fn, mesh=mesh, rules=DEFAULT_RULES, microbatches=cfg.microbatches)
  if sharding_report:
    runner.print_sharding_report(trainer)
  per_process = cfg.global_batch_size // nproc
  data = SFTMixtureIterator(sources, tokenizer, batch_size=per_process, seed=cfg.seed,
                            process_index=jax.process_index(), process_count=nproc, overlong=cfg.overlong)
  metadata = _metadata(cfg, model_cfg, tokenizer, init_meta)
  checkpointer = runner.Checkpointer(ckpt_dir, metadata=metadata, keep=cfg.keep_checkpoints,
                                     async_save=cfg.async_checkpointing,
                                     data_state_fn=lambda: {"iterator": data.get_state()},
                                     check_metadata=check_metadata)
  try:
    def init_state():
      try:
        if init_ckpt is not None:
          params, _ = runner.init_params(trainer, checkpoint_dir=init_ckpt, step=init_meta["step"])
        else:
          params, _ = runner.init_params(trainer, hf_dir=cfg.init_hf)
      except runner.RunError as e:
        raise ConfigError(str(e)) from None
      return trainer.state_from(0, params, None)
    state, start_step, data_state = runner.resume_or_init(trainer, checkpointer, workdir, init_state)
    if data_state is not None:
      data.set_state(data_state["iterator"])

    def next_inputs(step: int) -> runner.StepInputs:
      entry = runner.phase_for_step(plan, step)
      tokens_seen = runner.tokens_before_step(plan, step)
      weights = entry.phase.normalized_mixture()
      batch = data.next_batch(weights, entry.seq_len)
      fields = {"phase": entry.phase.name, "phase_index": entry.index,
                "tokens_seen": tokens_seen + entry.tokens_per_step, "fill": float((batch["segment_ids"] > 0).mean())}
      fields.update({f"mixture/{n}": weights.get(n, 0.0) for n in names})
      return runner.StepInputs(batch=batch, lr=schedule.lr_host(tokens_seen),
                               rope_theta=entry.phase.rope_theta or model_cfg.rope_theta,
                               tokens=int((batch["segment_ids"] > 0).sum()) * nproc, seq_len=entry.seq_len,
                               fields=fields, boundary=step + 1 == entry.end_step)

    def log_fields(step: int, host: dict[str, Any], inputs: runner.StepInputs) -> dict[str, Any]:
      del step, inputs
      row = {"dropped_conversations": data.stats["dropped"], "truncated_conversations": data.stats["truncated"]}
      row.update(runner.per_source_losses(host["sums"], names, prefix="loss/"))
      return row

    def evaluate(step: int, state) -> dict[str, Any]:
      del step
      entry = runner.phase_for_step(plan, total_steps - 1)
      theta = entry.phase.rope_theta or model_cfg.rope_theta
      loss_sum, weight_sum, sums = runner.eval_sums(
          trainer, state.params, data.eval_batches(entry.seq_len, max_batches=cfg.eval_batches), theta, len(names))
      if weight_sum == 0:
        log.warning("no eval conversations in any SFT source (eval_fraction too small for the data?)")
        return {"eval/loss_tokens": 0.0}
      row = {"eval/loss": loss_sum / weight_sum, "eval/loss_tokens": weight_sum}
      row.update(runner.per_source_losses(sums, names, prefix="eval/loss/"))
      return row

    result = runner.run_loop(cfg, trainer, state, workdir=workdir, start_step=start_step, total_steps=total_steps,
                             next_inputs=next_inputs, checkpointer=checkpointer, stop=stop,
                             evaluate=evaluate if cfg.eval_batches else None, log_fields=log_fields)
  finally:
    checkpointer.close()
  summary = {"stage": cfg.stage,
             **runner.run_summary(result, checkpointer, start_step=start_step, total_steps=total_steps,
                                  workdir=workdir),
             "init": init_meta, "data": dict(data.stats), "checkpoint_step": checkpointer.last_saved}
  runner.write_summary(workdir, summary)
  runner.raise_if_stopped(result)
  return summary


def _metadata(cfg: SFTConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, init_meta: dict[str, Any]) -> dict:
  from nanbeige_jax.checkpoint import build_metadata
  extra = {"init": {k: v for k, v in init_meta.items() if k != "sources"}, "sft_sources": cfg.sources,
           "schedule": as_dict(cfg.schedule), "optimizer": as_dict(cfg.optimizer or OptimizerConfig()),
           "global_batch_size": cfg.global_batch_size, "seed": cfg.seed}
  if init_meta.get("sources"):
    extra["sources"] = init_meta["sources"]  # pre-training sources: what launch/eval.py measures perplexity on
  return build_metadata(model_cfg, stage=cfg.stage, tokenizer_fingerprint=tokenizer.fingerprint(), extra=extra)
