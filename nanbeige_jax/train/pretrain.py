"""Pre-training: FG-WSD schedule + staged data mixture + the shared train core + the one checkpoint layer.

``run_pretrain(cfg, workdir)`` is what ``launch/pretrain.py`` calls. A run is a pure function of its config and
seed: the data iterator state, the optimizer state and the step are checkpointed together, so a run restarted
from its workdir (after a crash, a SIGKILL or a SIGTERM preemption) sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import time
from typing import Any

import jax
import numpy as np

from nanbeige_jax import checkpoint as ckpt_lib
from nanbeige_jax.config import ConfigError, as_dict, check_keys, gin_dataclass
from nanbeige_jax.data.mixture import MixtureIterator
from nanbeige_jax.data.sources import build_source
from nanbeige_jax.data.tokenizer import Tokenizer
from nanbeige_jax.metrics import MetricsWriter, Progress, device_peak_flops, measure_cpu_peak_flops
from nanbeige_jax.model import ModelConfig, get_preset
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.optim.schedules import FGWSDSchedule, PhasePlan, plan_steps
from nanbeige_jax.sharding import DEFAULT_RULES, make_mesh
from nanbeige_jax.train.lm import make_lm_loss
from nanbeige_jax.train.loop import Trainer
from nanbeige_jax.train.state import TrainState

log = logging.getLogger("nanbeige_jax.pretrain")

DEFAULT_SOURCES = {
    "shakespeare": {"kind": "shakespeare"},
    "python_stdlib": {"kind": "python_stdlib"},
    "arithmetic": {"kind": "arithmetic"},
}
MESH_KEYS = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp", "dcn_tensor")


class TrainingStopped(RuntimeError):
  """The run stopped on purpose with a clear reason (e.g. too many consecutive non-finite steps)."""


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """Everything a pre-training run needs. Bound from gin (``PretrainConfig.<field> = ...``)."""

  model_preset: str = "tiny"
  model_overrides: dict = dataclasses.field(default_factory=dict)
  schedule: Any = None                      # FGWSDSchedule (gin: @FGWSDSchedule())
  optimizer: Any = None                     # OptimizerConfig (gin: @OptimizerConfig()); None -> defaults
  sources: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SOURCES))
  seq_len: int = 256                        # for phases that do not set their own seq_len
  global_batch_size: int = 16               # sequences per optimizer step (all processes)
  microbatches: int = 1                     # gradient accumulation: the global batch is split into this many
  seed: int = 0
  tokenizer_path: str | None = None         # a sentencepiece model; None -> train one on the sources (workdir)
  tokenizer_vocab_size: int = 2048
  tokenizer_train_docs: int = 400           # documents per source sampled to train the default tokenizer
  log_every_steps: int = 10
  eval_every_steps: int = 100
  eval_batches: int = 4
  checkpoint_every_steps: int = 250
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  z_loss_weight: float = 0.0
  vocab_chunk: int = 8192
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
  max_steps: int | None = None              # stop early after this many steps in total (smoke runs)
  max_consecutive_nonfinite: int = 5        # stop after this many non-finite steps in a row (0 = never)
  skip_bad_lines: bool = False              # JSONL sources: skip and count malformed lines instead of failing
  plot: bool = True

  def __post_init__(self):
    if self.schedule is None:
      raise ValueError("PretrainConfig.schedule is not set: bind it in gin, e.g. "
                       "PretrainConfig.schedule = @FGWSDSchedule() with a schedule file from configs/schedules/")
    if not isinstance(self.schedule, FGWSDSchedule):
      raise ValueError(f"PretrainConfig.schedule: expected an FGWSDSchedule, found {type(self.schedule).__name__}")
    if self.optimizer is not None and not isinstance(self.optimizer, OptimizerConfig):
      raise ValueError(f"PretrainConfig.optimizer: expected an OptimizerConfig, found "
                       f"{type(self.optimizer).__name__}")
    for name in ("seq_len", "global_batch_size", "microbatches", "log_every_steps", "eval_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints", "tokenizer_vocab_size"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"PretrainConfig.{name}: expected a positive int, found {v!r}")
    if self.global_batch_size % self.microbatches:
      raise ValueError(f"PretrainConfig.global_batch_size={self.global_batch_size} is not divisible by "
                       f"microbatches={self.microbatches}")
    if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
      raise ValueError(f"PretrainConfig.max_steps: expected a positive int or None, found {self.max_steps!r}")
    if not isinstance(self.sources, dict) or not self.sources:
      raise ValueError("PretrainConfig.sources: expected a non-empty dict name -> {kind: ..., ...}")
    for name, spec in self.sources.items():
      if not isinstance(spec, dict) or "kind" not in spec:
        raise ValueError(f"PretrainConfig.sources[{name!r}]: expected a dict with a 'kind' key, found {spec!r}")
    check_keys("PretrainConfig.mesh", self.mesh, MESH_KEYS)
    used = set()
    for phase in self.schedule.phases:
      used.update(phase.mixture)
    unknown = sorted(used - set(self.sources))
    if unknown:
      raise ValueError(f"PretrainConfig: the schedule's mixtures name source(s) {unknown} that are not in "
                       f"PretrainConfig.sources {sorted(self.sources)}")

  def model_config(self) -> ModelConfig:
    return get_preset(self.model_preset, **self.model_overrides)


# --- set-up helpers ----------------------------------------------------------------------------------------------
def build_sources(cfg: PretrainConfig) -> dict[str, Any]:
  out = {}
  for name, spec in cfg.sources.items():
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    if spec["kind"] == "jsonl" and cfg.skip_bad_lines:
      kwargs.setdefault("skip_bad_lines", True)
    out[name] = build_source(spec["kind"], name, **kwargs)
    out[name].validate()
  return out


def load_or_train_tokenizer(cfg: PretrainConfig, sources: dict[str, Any], workdir: pathlib.Path) -> Tokenizer:
  if cfg.tokenizer_path:
    return Tokenizer.load(cfg.tokenizer_path)
  path = workdir / "tokenizer.model"
  if path.exists():
    return Tokenizer.load(path)
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


def phase_for_step(plan: list[PhasePlan], step: int) -> PhasePlan:
  for entry in plan:
    if entry.start_step <= step < entry.end_step:
      return entry
  return plan[-1]


def tokens_before_step(plan: list[PhasePlan], step: int) -> int:
  entry = phase_for_step(plan, step)
  return entry.start_tokens + (step - entry.start_step) * entry.tokens_per_step


class _StopSignal:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, exit cleanly."""

  def __init__(self):
    self.requested = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    return False


def _preemption_point(step: int) -> bool:
  if jax.process_count() == 1:
    return False
  try:
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # the preemption service is only set up by jax.distributed on some platforms
    return False


# --- the run -------------------------------------------------------------------------------------------------------
def run_pretrain(cfg: PretrainConfig, workdir: str | os.PathLike, *, fresh: bool = False,
                 operative_config: str | None = None) -> dict[str, Any]:
  """Train (or resume) in ``workdir``. Returns a summary dict (also written to ``<workdir>/summary.json``)."""
  workdir = pathlib.Path(workdir)
  model_cfg = cfg.model_config()
  schedule: FGWSDSchedule = cfg.schedule
  opt_cfg = cfg.optimizer or OptimizerConfig()
  # Validate everything cheap before touching the workdir or compiling anything.
  plan = plan_steps(schedule, cfg.global_batch_size, seq_len=cfg.seq_len, rope_theta=model_cfg.rope_theta)
  for entry in plan:
    if entry.seq_len > model_cfg.max_position_embeddings:
      raise ConfigError(f"phase {entry.phase.name!r}: seq_len {entry.seq_len} exceeds the model's "
                        f"max_position_embeddings {model_cfg.max_position_embeddings}")
  total_steps = plan[-1].end_step
  if cfg.max_steps is not None:
    total_steps = min(total_steps, cfg.max_steps)
  nproc = jax.process_count()
  if cfg.global_batch_size % nproc:
    raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not divisible by {nproc} processes")
  mesh = make_mesh(**cfg.mesh)
  sources = build_sources(cfg)
  ckpt_dir = workdir / "checkpoints"
  if fresh and ckpt_dir.exists() and jax.process_index() == 0:
    aside = workdir / f"checkpoints.old.{int(time.time())}"
    os.replace(ckpt_dir, aside)
    log.warning("--fresh: moved the previous checkpoints aside to %s", aside)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizer = load_or_train_tokenizer(cfg, sources, workdir)
  tokenizer.check_fits(model_cfg.vocab_size)

  manager = ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=cfg.keep_checkpoints,
                                       async_save=cfg.async_checkpointing)
  latest = manager.latest_step()
  if latest is not None:
    meta = manager.read_metadata(latest)
    try:
      ckpt_lib.check_model_config(meta, model_cfg)
    except ckpt_lib.CheckpointError as e:
      raise ConfigError(f"{workdir} holds a checkpoint of a different model ({e}); refusing to resume into it: "
                        f"use another --workdir or pass --fresh to start over") from None
    if meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint()):
      raise ConfigError(f"{workdir}: checkpoint step {latest} was trained with tokenizer "
                        f"{meta.get('tokenizer_fingerprint')}, but the configured tokenizer is "
                        f"{tokenizer.fingerprint()}; pass --fresh to start over")

  tx = make_optimizer(opt_cfg)
  names = sorted(sources)
  loss_fn = make_lm_loss(num_sources=len(names), z_loss_weight=cfg.z_loss_weight, vocab_chunk=cfg.vocab_chunk)
  trainer = Trainer(model_cfg, tx, loss_fn, mesh=mesh, rules=DEFAULT_RULES, microbatches=cfg.microbatches)
  per_process = cfg.global_batch_size // nproc
  data = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=per_process, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=nproc, split="train")

  if latest is not None:
    restored = manager.restore(latest, params_target=trainer.abstract_params,
                               opt_state_target=trainer.abstract_opt_state)
    ds = restored.data_state or {}
    data.set_state(ds["iterator"])
    state = trainer.state_from(restored.step, restored.params, restored.opt_state, ds.get("skipped_steps", 0))
    start_step = restored.step
    log.info("resumed from %s step %d", ckpt_dir, start_step)
  else:
    state = trainer.init_state(cfg.seed)
    start_step = 0

  metadata = ckpt_lib.build_metadata(model_cfg, stage="pretrain", tokenizer_fingerprint=tokenizer.fingerprint(),
                                     extra={"schedule": as_dict(schedule), "optimizer": as_dict(opt_cfg),
                                            "global_batch_size": cfg.global_batch_size, "seed": cfg.seed,
                                            "sources": cfg.sources})
  if operative_config and jax.process_index() == 0:
    (workdir / "operative_config.gin").write_text(operative_config)

  platform = jax.devices()[0].platform
  peak = device_peak_flops()
  if peak is None and platform == "cpu":
    peak = measure_cpu_peak_flops()
  peak_total = peak * jax.device_count() if peak else None

  writer = MetricsWriter(workdir)
  progress = Progress(total_steps, start_step)
  summary: dict[str, Any] = {"start_step": start_step, "total_steps": total_steps}
  first_loss = None
  prev_metrics = None
  bad_streak = 0
  t_last, tokens_last, step_last = time.perf_counter(), tokens_before_step(plan, start_step), start_step
  last_saved = latest
  stop_reason = None

  def save(step: int, tokens_seen: int) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    manager.save(step, params=state.params, opt_state=state.opt_state, metadata=metadata,
                 data_state={"iterator": data.get_state(), "tokens_seen": int(tokens_seen),
                             "skipped_steps": int(state.skipped_steps)})
    last_saved = step

  def run_eval(step: int, tokens_seen: int, entry: PhasePlan) -> dict[str, float]:
    it = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=per_process, seed=cfg.seed + 1,
                         process_index=jax.process_index(), process_count=nproc, split="eval")
    uniform = {n: 1.0 for n in names}
    loss_sum = weight_sum = 0.0
    src_nll, src_tok = np.zeros(len(names)), np.zeros(len(names))
    theta = entry.phase.rope_theta or model_cfg.rope_theta
    for _ in range(cfg.eval_batches):
      out = trainer.eval_step(state.params, it.next_batch(uniform, cfg.seq_len), theta)
      loss_sum += float(out["loss_sum"])
      weight_sum += float(out["weight_sum"])
      src_nll += np.asarray(out["sums"]["source_nll"])
      src_tok += np.asarray(out["sums"]["source_tokens"])
    row = {"eval/loss": loss_sum / max(weight_sum, 1.0), "tokens_seen": tokens_seen}
    for i, n in enumerate(names):
      if src_tok[i] > 0:
        row[f"eval/loss/{n}"] = src_nll[i] / src_tok[i]
    writer.write(step, row)
    return row

  with _StopSignal() as stop:
    step = start_step
    while step < total_steps:
      entry = phase_for_step(plan, step)
      tokens_seen = tokens_before_step(plan, step)
      lr = schedule.lr_host(tokens_seen)
      theta = entry.phase.rope_theta or model_cfg.rope_theta
      weights = entry.phase.normalized_mixture()
      batch = data.next_batch(weights, entry.seq_len)
      state, metrics = trainer.train_step(state, batch, lr, theta)
      step += 1
      tokens_after = tokens_seen + entry.tokens_per_step
      # Non-finite policy, read one step behind so the host never stalls the device pipeline.
      if prev_metrics is not None:
        bad_streak = 0 if bool(prev_metrics["finite"]) else bad_streak + 1
        if cfg.max_consecutive_nonfinite and bad_streak >= cfg.max_consecutive_nonfinite:
          stop_reason = (f"{bad_streak} consecutive non-finite steps (limit {cfg.max_consecutive_nonfinite}) "
                         f"ending at step {step - 1}; updates were skipped and the last good checkpoint "
                         f"(step {last_saved}) is intact")
          break
      prev_metrics = metrics
      if step % cfg.log_every_steps == 0 or step == total_steps or step == start_step + 1:
        m = jax.device_get(metrics)
        now = time.perf_counter()
        dt = max(now - t_last, 1e-9)
        tok_s = (tokens_after - tokens_last) / dt
        loss = float(m["loss"])
        first_loss = loss if first_loss is None and start_step == 0 else first_loss
        row = {"loss": loss, "lr": lr, "phase": entry.phase.name, "phase_index": entry.index,
               "grad_norm": float(m["grad_norm"]), "tokens_seen": tokens_after, "tokens_per_sec": tok_s,
               "steps_per_sec": (step - step_last) / dt, "seq_len": entry.seq_len, "rope_theta": theta,
               "skipped_steps": int(state.skipped_steps)}
        if peak_total:
          row["mfu"] = tok_s * model_cfg.flops_per_token(entry.seq_len) / peak_total
        src_tok = np.asarray(m["sums"]["source_tokens"])
        for i, n in enumerate(names):
          row[f"mixture/{n}"] = weights.get(n, 0.0)
          if src_tok[i] > 0:
            row[f"loss/{n}"] = float(np.asarray(m["sums"]["source_nll"])[i] / src_tok[i])
        writer.write(step, row)
        mfu = f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""
        progress.update(step, f"loss {loss:.3f} | lr {lr:.2e} | {entry.phase.name} | "
                              f"{tokens_after / 1e6:.2f}M tok | {tok_s:,.0f} tok/s{mfu}")
        summary["last_loss"] = loss
        t_last, tokens_last, step_last = now, tokens_after, step
      if step % cfg.eval_every_steps == 0 or step == total_steps:
        summary["eval_loss"] = run_eval(step, tokens_after, entry)["eval/loss"]
      boundary = step == entry.end_step and step < total_steps
      if step % cfg.checkpoint_every_steps == 0 or boundary or step == total_steps:
        save(step, tokens_after)
      if stop.requested or _preemption_point(step):
        stop_reason = f"preempted ({stop.requested or 'preemption sync point'}) at step {step}"
        save(step, tokens_after)
        break
  progress.close()
  manager.wait_until_finished()
  manager.close()
  writer.close()
  summary.update({"first_loss": first_loss, "final_step": step, "stopped": stop_reason,
                  "skipped_steps": int(state.skipped_steps), "workdir": str(workdir)})
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plot and stop_reason is None:
      from nanbeige_jax.plot import plot_run
      summary["plot"] = plot_run(str(workdir / "metrics.jsonl"), str(workdir / "run.png"))
  if stop_reason and "non-finite" in stop_reason:
    raise TrainingStopped(stop_reason)
  return summary
