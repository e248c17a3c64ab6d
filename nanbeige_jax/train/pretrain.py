"""Pre-training: FG-WSD schedule + staged data mixture + the shared train core + the one checkpoint layer.

``run_pretrain(cfg, workdir)`` is what ``launch/pretrain.py`` calls. A run is a pure function of its config and
seed: the data iterator state, the optimizer state, the step and the non-finite counters are checkpointed together,
so a run restarted from its workdir (after a crash, a SIGKILL or a SIGTERM preemption) sees exactly the batches it
would have seen and its losses equal an uninterrupted run's bit for bit (on the same hardware and mesh).

Fault handling (see docs/faults.md):
* everything checkable is validated before the workdir is touched (config, mesh, sources, tokenizer/model
  vocabulary, an existing checkpoint's model and tokenizer), so bad input writes nothing;
* SIGTERM/SIGINT (and the multi-host preemption sync point) finish the current step, checkpoint and return;
  a second signal kills the process at once;
* resume restores the newest checkpoint that restores completely, moving corrupt newer ones aside
  (``nanbeige_jax.train.resume``); keep-last-N pruning never deletes the newest verified checkpoint; metric rows
  logged after the restored step by the interrupted run are dropped;
* non-finite steps are skipped by the train core and counted; ``max_consecutive_nonfinite`` in a row stop the run.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
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
from nanbeige_jax.train import resume
from nanbeige_jax.train.loop import Trainer

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
  data_root: str | None = None              # relative source `paths` are resolved against this directory
  plot: bool = True
  # Fault injection (tests, drills): 1-based steps whose batch gets NaN loss weights, so that step's loss and
  # gradients are non-finite and the non-finite policy runs for real. Applied on the host to the batch only; the
  # data stream and everything else are unchanged. Leave empty for real runs.
  fault_nonfinite_steps: tuple = ()

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
    if (isinstance(self.max_consecutive_nonfinite, bool) or not isinstance(self.max_consecutive_nonfinite, int)
        or self.max_consecutive_nonfinite < 0):
      raise ValueError(f"PretrainConfig.max_consecutive_nonfinite: expected an int >= 0 (0 = never stop), found "
                       f"{self.max_consecutive_nonfinite!r}")
    if isinstance(self.fault_nonfinite_steps, (str, bytes)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.fault_nonfinite_steps):
      raise ValueError(f"PretrainConfig.fault_nonfinite_steps: expected a list of steps >= 1, found "
                       f"{self.fault_nonfinite_steps!r}")
    object.__setattr__(self, "fault_nonfinite_steps", tuple(self.fault_nonfinite_steps))
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


def phase_for_step(plan: list[PhasePlan], step: int) -> PhasePlan:
  for entry in plan:
    if entry.start_step <= step < entry.end_step:
      return entry
  return plan[-1]


def tokens_before_step(plan: list[PhasePlan], step: int) -> int:
  entry = phase_for_step(plan, step)
  return entry.start_tokens + (step - entry.start_step) * entry.tokens_per_step


class _StopSignal:
  """SIGTERM/SIGINT -> finish the current step, checkpoint, return. A second signal ends the process at once
  (the default action of that signal), e.g. when an operator does not want to wait for the checkpoint."""

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
    if self.requested is not None:
      self._restore()
      signal.raise_signal(signum)
      return
    self.requested = signal.Signals(signum).name
    log.warning("%s received: finishing the current step, then checkpointing and exiting", self.requested)

  def _restore(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()
    return False


def _preemption_point(step: int) -> bool:
  if jax.process_count() == 1:
    return False
  try:
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
  except Exception:  # the preemption service is only set up by jax.distributed on some platforms
    return False


def _check_checkpoint_metadata(workdir: pathlib.Path, model_cfg: ModelConfig, tokenizer: Tokenizer | None,
                               step: int, meta: dict) -> None:
  if meta.get("stage") not in (None, "pretrain"):
    raise resume.ResumeError(f"{workdir}: checkpoint step {step} is a {meta.get('stage')!r} checkpoint, not a "
                             f"pre-training one; refusing to resume into it: use another --workdir or pass --fresh")
  try:
    ckpt_lib.check_model_config(meta, model_cfg)
  except ckpt_lib.CheckpointError as e:
    raise resume.ResumeError(f"{workdir} holds a checkpoint (step {step}) of a different model ({e}); refusing to "
                             f"resume into it: use another --workdir or pass --fresh to start over") from None
  if tokenizer is not None and meta.get("tokenizer_fingerprint") not in (None, tokenizer.fingerprint()):
    raise resume.ResumeError(f"{workdir}: checkpoint step {step} was trained with tokenizer "
                             f"{meta.get('tokenizer_fingerprint')}, but the configured tokenizer "
                             f"{tokenizer.source!r} is {tokenizer.fingerprint()}; pass --fresh to start over")


# --- the run -------------------------------------------------------------------------------------------------------
def run_pretrain(cfg: PretrainConfig, workdir: str | os.PathLike, *, fresh: bool = False,
                 operative_config: str | None = None) -> dict[str, Any]:
  """Train (or resume) in ``workdir``. Returns a summary dict (also written to ``<workdir>/summary.json``).

  Raises ConfigError (one line, nothing written) on bad input, ``resume.ResumeError`` (a ConfigError) when the
  workdir cannot be resumed, and TrainingStopped after too many consecutive non-finite steps. SIGTERM/SIGINT
  during the call (set-up included) make it checkpoint after the current step and return normally.
  """
  with _StopSignal() as stop:
    return _run(cfg, pathlib.Path(workdir), fresh, operative_config, stop)


def _run(cfg: PretrainConfig, workdir: pathlib.Path, fresh: bool, operative_config: str | None,
         stop: _StopSignal) -> dict[str, Any]:
  model_cfg = cfg.model_config()
  schedule: FGWSDSchedule = cfg.schedule
  opt_cfg = cfg.optimizer or OptimizerConfig()
  # Validate everything checkable before touching the workdir or compiling anything: bad input writes nothing.
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
  try:
    mesh = make_mesh(**cfg.mesh)
  except ValueError as e:
    raise ConfigError(f"PretrainConfig.mesh {cfg.mesh}: {' '.join(str(e).split())}") from None
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
  check_metadata = lambda step, meta: _check_checkpoint_metadata(workdir, model_cfg, tokenizer, step, meta)  # noqa
  if not fresh:
    resume.check_workdir(ckpt_dir, check_metadata)

  # From here on the workdir is written.
  metrics_path = workdir / "metrics.jsonl"
  if fresh and jax.process_index() == 0:
    stamp = int(time.time())
    for path in (ckpt_dir, metrics_path):
      if path.exists():
        aside = path.with_name(f"{path.name}.old.{stamp}")
        os.replace(path, aside)
        log.warning("--fresh: moved %s aside to %s", path, aside)
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is None:
    tokenizer = train_tokenizer(cfg, sources, workdir)
    tokenizer.check_fits(model_cfg.vocab_size)

  tx = make_optimizer(opt_cfg)
  names = sorted(sources)
  loss_fn = make_lm_loss(num_sources=len(names), z_loss_weight=cfg.z_loss_weight, vocab_chunk=cfg.vocab_chunk)
  trainer = Trainer(model_cfg, tx, loss_fn, mesh=mesh, rules=DEFAULT_RULES, microbatches=cfg.microbatches)
  per_process = cfg.global_batch_size // nproc
  data = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=per_process, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=nproc, split="train")

  # Keep-last-N is done here (resume.prune_checkpoints), not by orbax, so the newest good step is never deleted.
  open_manager = lambda: ckpt_lib.CheckpointManager(ckpt_dir, max_to_keep=None,  # noqa: E731
                                                    async_save=cfg.async_checkpointing)
  manager, restored, _ = resume.restore_with_fallback(open_manager, params_target=trainer.abstract_params,
                                                      opt_state_target=trainer.abstract_opt_state)
  bad_streak = 0
  if restored is not None:
    check_metadata(restored.step, restored.metadata)
    ds = restored.data_state
    data.set_state(ds["iterator"])
    state = trainer.state_from(restored.step, restored.params, restored.opt_state, ds.get("skipped_steps", 0))
    bad_streak = int(ds.get("nonfinite_streak", 0))
    state = state.replace(bad_streak=jax.device_put(np.int32(bad_streak), trainer.replicated))
    start_step = restored.step
    log.info("resumed from %s step %d", ckpt_dir, start_step)
  else:
    state = trainer.init_state(cfg.seed)
    start_step = 0
  if jax.process_index() == 0:
    dropped = resume.truncate_metrics(metrics_path, start_step)
    if dropped:
      log.warning("dropped %d metric row(s) logged after step %d by the interrupted run", dropped, start_step)

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
  if skipped_lines:
    summary["skipped_bad_lines"] = skipped_lines
  first_loss = None
  prev_metrics = None
  t_last, tokens_last, step_last = time.perf_counter(), tokens_before_step(plan, start_step), start_step
  last_saved = start_step if restored is not None else None
  stop_reason = None
  fault_steps = set(cfg.fault_nonfinite_steps)

  def save(step: int, tokens_seen: int) -> None:
    nonlocal last_saved
    if last_saved == step:
      return
    # The previous (async) save must be committed before it can be verified and older steps pruned; orbax's own
    # save would wait for it here anyway.
    manager.wait_until_finished()
    resume.prune_checkpoints(manager, cfg.keep_checkpoints)
    manager.save(step, params=state.params, opt_state=state.opt_state, metadata=metadata,
                 data_state={"iterator": data.get_state(), "tokens_seen": int(tokens_seen),
                             "skipped_steps": int(state.skipped_steps), "nonfinite_streak": int(state.bad_streak)})
    last_saved = step

  def nonfinite_check(metrics: Any, step_of_metrics: int) -> str | None:
    nonlocal bad_streak
    bad_streak = 0 if bool(metrics["finite"]) else bad_streak + 1
    if cfg.max_consecutive_nonfinite and bad_streak >= cfg.max_consecutive_nonfinite:
      return (f"{bad_streak} consecutive non-finite steps (limit {cfg.max_consecutive_nonfinite}) ending at step "
              f"{step_of_metrics}; their updates were skipped and the last good checkpoint "
              f"({ckpt_dir / str(last_saved) if last_saved is not None else 'none written yet'}) is intact")
    return None

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

  step = start_step
  while step < total_steps:
    if stop.requested:  # arrived during set-up or compilation: nothing trained since the last checkpoint
      stop_reason = f"preempted ({stop.requested}) at step {step}"
      break
    entry = phase_for_step(plan, step)
    tokens_seen = tokens_before_step(plan, step)
    lr = schedule.lr_host(tokens_seen)
    theta = entry.phase.rope_theta or model_cfg.rope_theta
    weights = entry.phase.normalized_mixture()
    batch = data.next_batch(weights, entry.seq_len)
    if step + 1 in fault_steps:  # fault injection (PretrainConfig.fault_nonfinite_steps)
      batch["loss_weights"] = np.full_like(batch["loss_weights"], np.nan)
    state, metrics = trainer.train_step(state, batch, lr, theta)
    step += 1
    tokens_after = tokens_seen + entry.tokens_per_step
    # Non-finite policy, read one step behind so the host never stalls the device pipeline.
    if prev_metrics is not None:
      stop_reason = nonfinite_check(prev_metrics, step - 1)
      if stop_reason:
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
  else:
    if prev_metrics is not None:  # the last step's finiteness (the loop reads one step behind)
      stop_reason = nonfinite_check(prev_metrics, step)
  progress.close()
  manager.wait_until_finished()
  resume.prune_checkpoints(manager, cfg.keep_checkpoints)
  manager.close()
  writer.close()
  summary.update({"first_loss": first_loss, "final_step": step, "stopped": stop_reason,
                  "skipped_steps": int(state.skipped_steps), "last_checkpoint": last_saved,
                  "workdir": str(workdir)})
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plot and stop_reason is None:
      from nanbeige_jax.plot import plot_run
      summary["plot"] = plot_run(str(workdir / "metrics.jsonl"), str(workdir / "run.png"))
  if stop_reason and "non-finite" in stop_reason:
    raise TrainingStopped(stop_reason)
  return summary
