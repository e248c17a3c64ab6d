"""The dry run of a pre-training config: the whole run validated and planned without data or accelerators.

``python launch/pretrain.py --gin_file pretrain/nanbeige4_3b.gin --dry_run [--topology v5p-8] [--mfu 0.4]`` runs
``dry_run(cfg, topology=..., mfu=...)``: the launcher's own pre-flight (``stage.validate_config``: the schedule plan
against the model's positions, every phase's batch split over the mesh, the attention memory of every phase's rows
on the TPU), then a table of every phase (tokens, steps, rows x seq_len, tokens per step, LR at its first and last
step, RoPE base, mixture, the per-device batch and the wall-clock the steps imply at ``mfu`` of the topology's bf16
peak), and an AOT compile of the real train step (``nanbeige_jax.aot.compile_for_topology``: forward, backward,
AdamW) for each distinct (rows, seq_len) on the named TPU topology, with its memory per chip and whether it fits.
``DryRunResult.ok`` is False when a shape does not fit (the launcher then exits 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from nanbeige_jax import aot
from nanbeige_jax.metrics import format_duration
from nanbeige_jax.sharding import DEFAULT_RULES, ShardingConfig, format_bytes
from nanbeige_jax.train import stage


@dataclasses.dataclass
class DryRunResult:
  text: str
  ok: bool
  phases: list[dict[str, Any]]
  compiled: dict[tuple[int, int], Any]  # (rows, seq_len) -> aot.AotResult


def _tokens(n: float) -> str:
  for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return str(int(n))


def _duration(seconds: float) -> str:
  return f"{seconds / 86400:,.1f} days" if seconds >= 2 * 86400 else format_duration(seconds)


def phase_rows(run: stage.StageRun, topology: aot.TopologySpec, mfu: float) -> list[dict[str, Any]]:
  """One dict per planned phase: name, tokens, steps, rows, seq_len, tokens per step, LR at the first and last
  step, RoPE base, mixture, rows per device and the wall-clock at ``mfu`` on ``topology``."""
  cfg, model_cfg = run.cfg, run.model_cfg
  out = []
  for entry in run.plan:
    first_tokens = entry.start_tokens
    last_tokens = entry.start_tokens + max(entry.num_steps - 1, 0) * entry.tokens_per_step
    flops = model_cfg.flops_per_token(entry.seq_len) * entry.tokens_per_step * entry.num_steps
    seconds = flops / (mfu * topology.peak_flops_per_chip * topology.chips)
    out.append({"phase": entry.phase.name, "tokens": entry.num_steps * entry.tokens_per_step,
                "steps": entry.num_steps, "rows": entry.rows, "seq_len": entry.seq_len,
                "tokens_per_step": entry.tokens_per_step,
                "lr_first": cfg.schedule.step_lr(first_tokens, entry.tokens_per_step),
                "lr_last": cfg.schedule.step_lr(last_tokens, entry.tokens_per_step),
                "rope_theta": entry.phase.rope_theta or model_cfg.rope_theta,
                "mixture": entry.phase.normalized_mixture(), "rows_per_device": entry.rows / topology.chips,
                "seconds": seconds})
  return out


def dry_run(cfg: Any, spec: stage.Stage, model_cfg: Any, *, topology: str, mfu: float = 0.4,
            compile_steps: bool = True) -> DryRunResult:
  """Validate (ConfigError on bad input), plan and (``compile_steps``) AOT-compile ``cfg`` for ``topology``."""
  if not 0 < mfu <= 1:
    raise ValueError(f"--mfu: expected a fraction in (0, 1], found {mfu!r}")
  spec_topology = aot.get_topology(topology)
  devices = aot.topology_devices(spec_topology) if compile_steps else None
  run = stage.validate_config(cfg, spec, model_cfg, platform="tpu", devices=devices)
  phases = phase_rows(run, spec_topology, mfu)
  total_tokens = sum(p["tokens"] for p in phases)
  total_seconds = sum(p["seconds"] for p in phases)
  lines = [f"dry run: {model_cfg.num_params() / 1e9:.2f}B params, {len(phases)} phases, {run.total_steps:,} steps, "
           f"{_tokens(total_tokens)} tokens; mesh {dict(run.mesh.shape)} on {spec_topology.name} "
           f"({spec_topology.chips} chips), microbatches {cfg.microbatches}; wall-clock at {mfu:.0%} MFU of "
           f"{spec_topology.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip",
           "",
           "| phase | tokens | steps | rows x seq_len | tokens/step | LR first -> last | RoPE base | rows/chip | "
           "wall-clock | mixture |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for p in phases:
    mixture = ", ".join(f"{k} {v:.2f}" for k, v in p["mixture"].items())
    lines.append(f"| {p['phase']} | {_tokens(p['tokens'])} | {p['steps']:,} | {p['rows']} x {p['seq_len']} | "
                 f"{_tokens(p['tokens_per_step'])} | {p['lr_first']:.2e} -> {p['lr_last']:.2e} | "
                 f"{p['rope_theta']:.3g} | {p['rows_per_device']:g} | {_duration(p['seconds'])} | {mixture} |")
  lines.append(f"| total | {_tokens(total_tokens)} | {run.total_steps:,} | | | | | | {_duration(total_seconds)} | |")
  compiled: dict[tuple[int, int], Any] = {}
  ok = True
  if compile_steps:
    sharding = ShardingConfig(**cfg.mesh, rules=DEFAULT_RULES)
    lines += ["", f"AOT train step per distinct (rows, seq_len) on {spec_topology.name}, "
                  f"{format_bytes(spec_topology.hbm_per_chip)} HBM per chip:",
              "", "| rows x seq_len | micro-batch rows | memory per chip | fits |", "|---|---|---|---|"]
    for rows, seq_len in sorted({(p["rows"], p["seq_len"]) for p in phases if p["steps"]}):
      result = aot.compile_for_topology(model_cfg, spec_topology, global_batch=rows, seq_len=seq_len,
                                        sharding=sharding, microbatches=cfg.microbatches,
                                        vocab_chunk=cfg.vocab_chunk, devices=devices)
      compiled[(rows, seq_len)] = result
      memory = result.memory
      if memory.fits:
        verdict = f"FITS ({format_bytes(-memory.over_by)} free)"
      elif memory.refused is not None:
        verdict = "DOES NOT FIT (the TPU compiler ran out of HBM)"
      else:
        verdict = f"DOES NOT FIT ({format_bytes(memory.over_by)} over)"
      ok = ok and memory.fits
      used = "n/a" if memory.refused is not None else f"{format_bytes(memory.total)} / {format_bytes(memory.hbm)}"
      lines.append(f"| {rows} x {seq_len} | {rows // cfg.microbatches} | {used} | {verdict} |")
  return DryRunResult(text="\n".join(lines), ok=ok, phases=phases, compiled=compiled)
