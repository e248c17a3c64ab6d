"""Supervised fine-tuning: chat data, loss on assistant tokens only, multi-stage hand-off through checkpoints.

``run_sft(cfg, workdir)`` is what ``launch/sft.py`` calls. A stage starts from the parameters of any checkpoint of
this project (params only, fresh optimizer: the stage hand-off; ``SFTConfig.init_from``) or of a Hugging Face
directory (``init_hf``) and trains on a per-domain mixture of chat sources (``nanbeige_jax.data.sft_data``) under
an ``FGWSDSchedule`` (warmup + one stable phase carrying the stage's mixture + decay; it counts row tokens).
Conversations are rendered with the Nanbeige chat template and packed with segment ids; the loss weights are the
assistant mask, divided by the assistant-token count of the whole global batch (``nanbeige_jax.train.step``).
This module is a spec of the stage template (``nanbeige_jax.train.stage``).

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
from typing import Any

import jax

from nanbeige_jax import paths
from nanbeige_jax.checkpoint import build_metadata
from nanbeige_jax.config import ConfigError, as_dict, gin_dataclass
from nanbeige_jax.data import chat_template
from nanbeige_jax.data.sft_data import OVERLONG_POLICIES, SFTMixtureIterator, build_chat_source
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.hf import model_config_from_hf, read_hf_config
from nanbeige_jax.objectives.lm import eval_sums, make_lm_loss, per_source_losses
from nanbeige_jax.optim.optimizer import OptimizerConfig
from nanbeige_jax.train import stage
from nanbeige_jax.train.checkpointing import (RunError, check_tokenizer, init_params, model_config_from_metadata,
                                              read_checkpoint_metadata, resolve_run_dirs)
from nanbeige_jax.train.loop import StepInputs

log = logging.getLogger("nanbeige_jax.sft")

COMPILE_TIME_FIELDS = ("dtype", "scan_layers", "remat_policy", "attention_impl", "max_position_embeddings",
                       "max_xla_attention_bytes")
CHAT_SPECIALS = (chat_template.IM_START, chat_template.IM_END, chat_template.THINK_START, chat_template.THINK_END)


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class SFTConfig(stage.RunConfig):
  """Everything an SFT stage needs. Bound from gin (``SFTConfig.<field> = ...``); the shared run settings
  (schedule, optimizer, batch, logging/eval/checkpoint cadence, mesh, max_steps, non-finite limit) are
  ``stage.RunConfig``'s."""

  stage: str = "sft"                        # checkpoint metadata stage name (e.g. sft_cold_start, sft_overall)
  init_from: str | None = None              # a run workdir (holding checkpoints/) or a checkpoint directory
  init_step: int | None = None              # None: the latest step of init_from
  init_hf: str | None = None                # a Hugging Face Llama directory instead of init_from
  model_overrides: dict = dataclasses.field(default_factory=dict)  # compile-time fields only (dtype, remat...)
  tokenizer_path: str | None = None         # None: <init workdir>/tokenizer.model (or the HF dir's)
  sources: dict = dataclasses.field(default_factory=dict)  # name -> {kind: jsonl|arithmetic, ...}
  seq_len: int = 512                        # packed row length, for phases that do not set their own
  # Conversations longer than seq_len: "drop" (default: counted in the data stats as dropped) or "truncate" (trains
  # a cut assistant turn that never reaches its <|im_end|>).
  overlong: str = "drop"
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 2

  def __post_init__(self):
    if not isinstance(self.stage, str) or not self.stage:
      raise ValueError(f"SFTConfig.stage: expected a non-empty string, found {self.stage!r}")
    if self.schedule is None:
      raise ValueError("SFTConfig.schedule is not set: bind it in gin, e.g. SFTConfig.schedule = @FGWSDSchedule()")
    stage.validate_run_config(self, extra_positive=("vocab_chunk",), sources_hint="jsonl|arithmetic")
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
def load_tokenizer(cfg: SFTConfig, workdir: paths.PathLike, resuming: bool) -> Tokenizer:
  if cfg.tokenizer_path:
    path = paths.as_path(cfg.tokenizer_path)
  elif resuming and paths.is_file(paths.join(workdir, "tokenizer.model")):
    path = paths.as_path(paths.join(workdir, "tokenizer.model"))
  elif cfg.init_from is not None:
    path = resolve_run_dirs(cfg.init_from, what="SFTConfig.init_from:")[1] / "tokenizer.model"
  elif cfg.init_hf is not None:
    path = paths.as_path(cfg.init_hf) / "tokenizer.model"
  else:
    raise ConfigError("no tokenizer: set SFTConfig.tokenizer_path (or init from a run that has one)")
  if not paths.is_file(path):
    raise ConfigError(f"tokenizer {str(path)!r} does not exist; set SFTConfig.tokenizer_path (--tokenizer)")
  tokenizer = Tokenizer.load(path)
  missing = [p for p in CHAT_SPECIALS if p not in tokenizer.special_ids]
  if missing:
    raise ConfigError(f"tokenizer {str(path)!r} lacks the chat-template special token(s) {missing}; SFT needs "
                      f"{list(CHAT_SPECIALS)} as atomic pieces")
  return tokenizer


# --- the spec --------------------------------------------------------------------------------------------------
class SFTStage(stage.Stage):
  def stage_name(self, run: stage.StageRun) -> str:
    return run.cfg.stage

  def prepare(self, run: stage.StageRun) -> None:
    cfg = run.cfg
    run.extra["sources"] = {name: build_chat_source(name, spec) for name, spec in cfg.sources.items()}
    run.extra["names"] = list(run.extra["sources"])
    init_meta: dict[str, Any] = {}
    init_ckpt, source_meta = None, {}
    if run.resume is not None:
      resume_meta = run.resume[1]
      run.model_cfg = model_config_from_metadata(resume_meta, str(run.ckpt_dir), cfg.model_overrides)
      extra = resume_meta.get("extra") or {}
      init_meta = {**(extra.get("init") or {}), "sources": extra.get("sources")}
    elif cfg.init_from is not None:
      init_ckpt, _ = resolve_run_dirs(cfg.init_from, what="SFTConfig.init_from:")
      source_meta, source_step = read_checkpoint_metadata(init_ckpt, cfg.init_step)
      run.model_cfg = model_config_from_metadata(source_meta, str(init_ckpt), cfg.model_overrides)
      init_meta = {"from": str(init_ckpt), "step": source_step, "stage": source_meta.get("stage"),
                   "sources": (source_meta.get("extra") or {}).get("sources")}
    elif cfg.init_hf is not None:
      run.model_cfg = model_config_from_hf(read_hf_config(cfg.init_hf), **cfg.model_overrides)
      init_meta = {"from": str(cfg.init_hf), "stage": "hf", "sources": None}
    else:
      raise ConfigError("SFT starts from trained parameters: set SFTConfig.init_from (--init_from, a run or "
                        "checkpoint directory of this project) or SFTConfig.init_hf (--init_hf)")
    run.extra["init_meta"], run.extra["init_ckpt"] = init_meta, init_ckpt
    run.tokenizer = load_tokenizer(cfg, run.workdir, resuming=run.resume is not None)
    run.tokenizer.check_fits(run.model_cfg.vocab_size)
    if run.resume is None and init_ckpt is not None:
      check_tokenizer(source_meta, run.tokenizer, f"{init_ckpt}: the init checkpoint")

  def write_workdir(self, run: stage.StageRun) -> None:
    tok_copy = paths.join(run.workdir, "tokenizer.model")
    if jax.process_index() == 0 and not paths.same_path(run.tokenizer.source, tok_copy):
      paths.copy(run.tokenizer.source, tok_copy)  # atomic on local disk, one object upload elsewhere

  def objective(self, run: stage.StageRun):
    return make_lm_loss(num_sources=len(run.extra["names"]), vocab_chunk=run.cfg.vocab_chunk)

  def build_data(self, run: stage.StageRun):
    cfg, per_process = run.cfg, run.cfg.global_batch_size // jax.process_count()
    return SFTMixtureIterator(run.extra["sources"], run.tokenizer, batch_size=per_process, seed=cfg.seed,
                              process_index=jax.process_index(), process_count=jax.process_count(),
                              overlong=cfg.overlong)

  def metadata(self, run: stage.StageRun) -> dict:
    cfg, init_meta = run.cfg, run.extra["init_meta"]
    extra = {"init": {k: v for k, v in init_meta.items() if k != "sources"}, "sft_sources": cfg.sources,
             "schedule": as_dict(cfg.schedule), "optimizer": as_dict(cfg.optimizer or OptimizerConfig()),
             "global_batch_size": cfg.global_batch_size, "seed": cfg.seed}
    if init_meta.get("sources"):
      extra["sources"] = init_meta["sources"]  # pre-training sources: what launch/eval.py measures perplexity on
    return build_metadata(run.model_cfg, stage=cfg.stage, tokenizer_fingerprint=run.tokenizer.fingerprint(),
                          extra=extra)

  def init_state(self, run: stage.StageRun):
    try:
      if run.extra["init_ckpt"] is not None:
        params, _ = init_params(run.trainer, checkpoint_dir=run.extra["init_ckpt"], step=run.extra["init_meta"]["step"])
      else:
        params, _ = init_params(run.trainer, hf_dir=run.cfg.init_hf)
    except RunError as e:
      raise ConfigError(str(e)) from None
    return run.trainer.state_from(0, params, None)

  def next_inputs(self, run: stage.StageRun, step: int, state: Any) -> StepInputs:
    entry = stage.phase_for_step(run.plan, step)
    batch = run.phase_batch(entry, lambda: run.data.next_batch(entry.phase.normalized_mixture(), entry.seq_len))
    real = batch["segment_ids"] > 0
    return run.schedule_inputs(step, batch, tokens=int(real.sum()) * jax.process_count(),
                               fields={"fill": float(real.mean())})

  def log_fields(self, run: stage.StageRun, step: int, host: dict[str, Any], inputs: StepInputs) -> dict[str, Any]:
    row = {"dropped_conversations": run.data.stats["dropped"], "truncated_conversations": run.data.stats["truncated"],
           "special_text_conversations": run.data.stats.get("special_text", 0)}
    row.update(per_source_losses(host["sums"], run.extra["names"], prefix="loss/"))
    return row

  def evaluate(self, run: stage.StageRun, step: int, state: Any) -> dict[str, Any]:
    entry = stage.phase_for_step(run.plan, run.total_steps - 1)
    names = run.extra["names"]
    loss_sum, weight_sum, sums = eval_sums(
        run.trainer, state.params, run.data.eval_batches(entry.seq_len, max_batches=run.cfg.eval_batches),
        run.rope_theta(run.total_steps - 1), len(names))
    if weight_sum == 0:
      log.warning("no eval conversations in any SFT source (eval_fraction too small for the data?)")
      return {"eval/loss_tokens": 0.0}
    row = {"eval/loss": loss_sum / weight_sum, "eval/loss_tokens": weight_sum}
    row.update(per_source_losses(sums, names, prefix="eval/loss/"))
    return row

  def summary(self, run: stage.StageRun, summary: dict[str, Any]) -> dict[str, Any]:
    return {"stage": run.cfg.stage, **summary, "init": run.extra["init_meta"], "data": dict(run.data.stats),
            "checkpoint_step": summary["last_checkpoint"]}


def run_sft(cfg: SFTConfig, workdir: str | os.PathLike, *, fresh: bool = False,
            operative_config: str | None = None, sharding_report: bool = False) -> dict[str, Any]:
  """Train (or resume) an SFT stage in ``workdir`` (``stage.run_stage`` with ``SFTStage``); returns the summary
  (also ``<workdir>/summary.json``). Fault handling is the stage template's, as for pre-training."""
  return stage.run_stage(cfg, workdir, SFTStage(), fresh=fresh, operative_config=operative_config,
                         sharding_report=sharding_report)
