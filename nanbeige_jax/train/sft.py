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
import numpy as np

from nanbeige_jax.config import ConfigError, as_dict, check_keys, gin_dataclass
from nanbeige_jax.data import chat_template
from nanbeige_jax.data.sft_data import OVERLONG_POLICIES, SFTMixtureIterator, build_chat_source
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.metrics import MetricsWriter, Progress
from nanbeige_jax.model import ModelConfig
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.optim.schedules import FGWSDSchedule, PhasePlan, plan_steps
from nanbeige_jax.sharding import DEFAULT_RULES, make_mesh
from nanbeige_jax.train import runner
from nanbeige_jax.train.lm import make_lm_loss
from nanbeige_jax.train.loop import Trainer

log = logging.getLogger("nanbeige_jax.sft")

MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")
COMPILE_TIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "max_position_embeddings")
CHAT_SPECIALS = (chat_template.IM_START, chat_template.IM_END, chat_template.THINK_START, chat_template.THINK_END)


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Everything an SFT stage needs. Bound from gin (``SFTConfig.<field> = ...``)."""

  stage: str = "sft"                        # checkpoint metadata stage name (e.g. sft_cold_start, sft_overall)
  init_from: str | None = None              # a run workdir (holding checkpoints/) or a checkpoint directory
  init_step: int | None = None              # None: the latest step of init_from
  init_hf: str | None = None                # a Hugging Face Llama directory instead of init_from
  model_overrides: dict = dataclasses.field(default_factory=dict)  # compile-time fields only (dtype, remat...)
  tokenizer_path: str | None = None         # None: <init workdir>/tokenizer.model (or the HF dir's)
  schedule: Any = None                      # FGWSDSchedule (gin: @FGWSDSchedule())
  optimizer: Any = None                     # OptimizerConfig; None -> defaults
  sources: dict = dataclasses.field(default_factory=dict)  # name -> {kind: jsonl|arithmetic, ...}
  seq_len: int = 512                        # for phases that do not set their own
  global_batch_size: int = 16               # packed rows per optimizer step (all processes)
  microbatches: int = 1
  seed: int = 0
  overlong: str = "truncate"                # conversations longer than seq_len: truncate | drop
  log_every_steps: int = 10
  eval_every_steps: int = 100
  eval_batches: int = 4
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 2
  async_checkpointing: bool = True
  vocab_chunk: int = 8192
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
  max_steps: int | None = None
  max_consecutive_nonfinite: int = 5

  def __post_init__(self):
    if not isinstance(self.stage, str) or not self.stage:
      raise ValueError(f"SFTConfig.stage: expected a non-empty string, found {self.stage!r}")
    if self.schedule is None:
      raise ValueError("SFTConfig.schedule is not set: bind it in gin, e.g. SFTConfig.schedule = @FGWSDSchedule()")
    if not isinstance(self.schedule, FGWSDSchedule):
      raise ValueError(f"SFTConfig.schedule: expected an FGWSDSchedule, found {type(self.schedule).__name__}")
    if self.optimizer is not None and not isinstance(self.optimizer, OptimizerConfig):
      raise ValueError(f"SFTConfig.optimizer: expected an OptimizerConfig, found {type(self.optimizer).__name__}")
    if self.init_from is not None and self.init_hf is not None:
      raise ValueError("SFTConfig: init_from and init_hf are mutually exclusive; set one")
    for name in ("seq_len", "global_batch_size", "microbatches", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints", "vocab_chunk"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"SFTConfig.{name}: expected a positive int, found {v!r}")
    if not isinstance(self.eval_batches, int) or self.eval_batches < 0:
      raise ValueError(f"SFTConfig.eval_batches: expected an int >= 0, found {self.eval_batches!r}")
    if self.global_batch_size % self.microbatches:
      raise ValueError(f"SFTConfig.global_batch_size={self.global_batch_size} is not divisible by "
                       f"microbatches={self.microbatches}")
    for name in ("max_steps", "init_step"):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_steps" else 0)):
        raise ValueError(f"SFTConfig.{name}: expected a {'positive' if name == 'max_steps' else 'non-negative'} "
                         f"int or None, found {v!r}")
    if self.overlong not in OVERLONG_POLICIES:
      raise ValueError(f"SFTConfig.overlong: expected one of {OVERLONG_POLICIES}, found {self.overlong!r}")
    if not isinstance(self.sources, dict) or not self.sources:
      raise ValueError("SFTConfig.sources: expected a non-empty dict name -> {kind: jsonl|arithmetic, ...}")
    for name, spec in self.sources.items():
      if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"SFTConfig.sources[{name!r}]: expected a dict with a 'kind' key, found {spec!r}")
    check_keys("SFTConfig.mesh", self.mesh, MESH_KEYS)
    bad = sorted(set(self.model_overrides) - set(COMPILE_TIME_FIELDS))
    if bad:
      raise ValueError(f"SFTConfig.model_overrides: {bad} cannot change at fine-tuning time (the architecture comes "
                       f"from the init checkpoint); allowed: {list(COMPILE_TIME_FIELDS)}")
    used = set()
    for phase in self.schedule.phases:
      used.update(phase.mixture)
    unknown = sorted(used - set(self.sources))
    if unknown:
      raise ValueError(f"SFTConfig: the schedule's mixtures name source(s) {unknown} that are not in "
                       f"SFTConfig.sources {sorted(self.sources)}")


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


def phase_for_step(plan: list[PhasePlan], step: int) -> PhasePlan:
  for entry in plan:
    if entry.start_step <= step < entry.end_step:
      return entry
  return plan[-1]


# --- the run ---------------------------------------------------------------------------------------------------
def run_sft(cfg: SFTConfig, workdir: str | os.PathLike, *, fresh: bool = False,
            operative_config: str | None = None) -> dict[str, Any]:
  """Train (or resume) an SFT stage in ``workdir``; returns a summary (also ``<workdir>/summary.json``)."""
  workdir = pathlib.Path(workdir)
  schedule: FGWSDSchedule = cfg.schedule
  opt_cfg = cfg.optimizer or OptimizerConfig()
  nproc = jax.process_count()
  if cfg.global_batch_size % nproc:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {nproc} processes")
  if fresh:
    runner.move_checkpoints_aside(workdir)
  sources = {name: build_chat_source(name, spec) for name, spec in cfg.sources.items()}
  names = list(sources)
  ckpt_dir = workdir / "checkpoints"
  resume_meta = None
  if ckpt_dir.is_dir():
    from nanbeige_jax.checkpoint import CheckpointManager
    with CheckpointManager(ckpt_dir, max_to_keep=None, async_save=False, create=False) as m:
      if m.latest_step() is not None:
        resume_meta = m.read_metadata(m.latest_step())
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
  plan = plan_steps(schedule, cfg.global_batch_size, seq_len=cfg.seq_len, rope_theta=model_cfg.rope_theta)
  for entry in plan:
    if entry.seq_len > model_cfg.max_position_embeddings:
      raise ConfigError(f"phase {entry.phase.name!r}: seq_len {entry.seq_len} exceeds the model's "
                        f"max_position_embeddings {model_cfg.max_position_embeddings}")
  total_steps = plan[-1].end_step if cfg.max_steps is None else min(plan[-1].end_step, cfg.max_steps)
  tokenizer = load_tokenizer(cfg, workdir, resuming=resume_meta is not None)
  tokenizer.check_fits(model_cfg.vocab_size)
  if resume_meta is None and init_ckpt is not None:
    stored = source_meta.get("tokenizer_fingerprint")
    if stored is not None and stored != tokenizer.fingerprint():
      raise ConfigError(f"{init_ckpt}: the init checkpoint was trained with tokenizer {stored}, but "
                        f"{tokenizer.source} has fingerprint {tokenizer.fingerprint()}")

  workdir.mkdir(parents=True, exist_ok=True)
  tok_copy = workdir / "tokenizer.model"
  if jax.process_index() == 0 and pathlib.Path(tokenizer.source).resolve() != tok_copy.resolve():
    shutil.copyfile(tokenizer.source, f"{tok_copy}.tmp.{os.getpid()}")
    os.replace(f"{tok_copy}.tmp.{os.getpid()}", tok_copy)
  if operative_config and jax.process_index() == 0:
    (workdir / "operative_config.gin").write_text(operative_config)

  mesh = make_mesh(**cfg.mesh)
  tx = make_optimizer(opt_cfg)
  loss_fn = make_lm_loss(num_sources=len(names), vocab_chunk=cfg.vocab_chunk)
  trainer = Trainer(model_cfg, tx, loss_fn, mesh=mesh, rules=DEFAULT_RULES, microbatches=cfg.microbatches)
  per_process = cfg.global_batch_size // nproc
  data = SFTMixtureIterator(sources, tokenizer, batch_size=per_process, seed=cfg.seed,
                            process_index=jax.process_index(), process_count=nproc, overlong=cfg.overlong)
  metadata = _metadata(cfg, model_cfg, tokenizer, init_meta)
  checkpointer = runner.Checkpointer(ckpt_dir, metadata=metadata, keep=cfg.keep_checkpoints,
                                     async_save=cfg.async_checkpointing,
                                     data_state_fn=lambda: {"iterator": data.get_state()})
  try:
    checkpointer.check_resumable(model_cfg, tokenizer.fingerprint())
  except runner.RunError as e:
    checkpointer.close()
    raise ConfigError(str(e)) from None
  if checkpointer.latest_step() is not None:
    state, start_step, data_state = checkpointer.restore(trainer)
    data.set_state(data_state["iterator"])
    log.info("resumed from %s step %d", ckpt_dir, start_step)
  else:
    try:
      if init_ckpt is not None:
        params, _ = runner.init_params(trainer, checkpoint_dir=init_ckpt, step=init_meta["step"])
      else:
        params, _ = runner.init_params(trainer, hf_dir=cfg.init_hf)
    except runner.RunError as e:
      checkpointer.close()
      raise ConfigError(str(e)) from None
    state = trainer.state_from(0, params, None)
    start_step = 0

  def next_inputs(step: int) -> runner.StepInputs:
    entry = phase_for_step(plan, step)
    tokens_seen = entry.start_tokens + (step - entry.start_step) * entry.tokens_per_step
    weights = entry.phase.normalized_mixture()
    batch = data.next_batch(weights, entry.seq_len)
    fields = {"phase": entry.phase.name, "phase_index": entry.index, "tokens_seen": tokens_seen + entry.tokens_per_step,
              "fill": float((batch["segment_ids"] > 0).mean())}
    fields.update({f"mixture/{n}": weights.get(n, 0.0) for n in names})
    return runner.StepInputs(batch=batch, lr=schedule.lr_host(tokens_seen),
                             rope_theta=entry.phase.rope_theta or model_cfg.rope_theta,
                             tokens=int((batch["segment_ids"] > 0).sum()) * nproc, seq_len=entry.seq_len,
                             fields=fields, boundary=step + 1 == entry.end_step)

  def log_fields(step: int, host: dict[str, Any], inputs: runner.StepInputs) -> dict[str, Any]:
    del step, inputs
    row = {"dropped_conversations": data.stats["dropped"], "truncated_conversations": data.stats["truncated"]}
    src_nll, src_tok = np.asarray(host["sums"]["source_nll"]), np.asarray(host["sums"]["source_tokens"])
    for i, n in enumerate(names):
      if src_tok[i] > 0:
        row[f"loss/{n}"] = float(src_nll[i] / src_tok[i])
    return row

  def evaluate(step: int, state) -> dict[str, Any]:
    del step
    if cfg.eval_batches == 0:
      return {}
    entry = phase_for_step(plan, total_steps - 1)
    theta = entry.phase.rope_theta or model_cfg.rope_theta
    loss_sum = weight_sum = 0.0
    src_nll, src_tok = np.zeros(len(names)), np.zeros(len(names))
    for batch in data.eval_batches(entry.seq_len, max_batches=cfg.eval_batches):
      out = trainer.eval_step(state.params, batch, theta)
      loss_sum += float(out["loss_sum"])
      weight_sum += float(out["weight_sum"])
      src_nll += np.asarray(out["sums"]["source_nll"])
      src_tok += np.asarray(out["sums"]["source_tokens"])
    if weight_sum == 0:
      log.warning("no eval conversations in any SFT source (eval_fraction too small for the data?)")
      return {"eval/loss_tokens": 0.0}
    row = {"eval/loss": loss_sum / weight_sum, "eval/loss_tokens": weight_sum}
    for i, n in enumerate(names):
      if src_tok[i] > 0:
        row[f"eval/loss/{n}"] = float(src_nll[i] / src_tok[i])
    return row

  writer = MetricsWriter(workdir)
  settings = runner.LoopSettings(total_steps=total_steps, log_every=cfg.log_every_steps,
                                 eval_every=cfg.eval_every_steps, checkpoint_every=cfg.checkpoint_every_steps,
                                 max_consecutive_nonfinite=cfg.max_consecutive_nonfinite)
  try:
    result = runner.train_loop(trainer, state, start_step=start_step, settings=settings, next_inputs=next_inputs,
                               checkpointer=checkpointer, writer=writer, progress=Progress(total_steps, start_step),
                               evaluate=evaluate if cfg.eval_batches else None, log_fields=log_fields,
                               flops_per_token=model_cfg.flops_per_token, peak_flops=runner.peak_flops_total())
  finally:
    checkpointer.close()
    writer.close()
  summary = {"stage": cfg.stage, "start_step": start_step, "total_steps": total_steps, "final_step": result.step,
             "first_loss": result.first_loss, "last_loss": result.last_loss,
             "eval_loss": (result.last_eval or {}).get("eval/loss"), "stopped": result.stop_reason,
             "skipped_steps": int(result.state.skipped_steps), "workdir": str(workdir), "init": init_meta,
             "data": dict(data.stats), "checkpoint_step": checkpointer.last_saved}
  runner.write_summary(workdir, summary)
  if result.stop_reason and "non-finite" in result.stop_reason:
    raise runner.TrainingStopped(result.stop_reason)
  return summary


def _metadata(cfg: SFTConfig, model_cfg: ModelConfig, tokenizer: Tokenizer, init_meta: dict[str, Any]) -> dict:
  from nanbeige_jax.checkpoint import build_metadata
  extra = {"init": {k: v for k, v in init_meta.items() if k != "sources"}, "sft_sources": cfg.sources,
           "schedule": as_dict(cfg.schedule), "optimizer": as_dict(cfg.optimizer or OptimizerConfig()),
           "global_batch_size": cfg.global_batch_size, "seed": cfg.seed}
  if init_meta.get("sources"):
    extra["sources"] = init_meta["sources"]  # pre-training sources: what launch/eval.py measures perplexity on
  return build_metadata(model_cfg, stage=cfg.stage, tokenizer_fingerprint=tokenizer.fingerprint(), extra=extra)
