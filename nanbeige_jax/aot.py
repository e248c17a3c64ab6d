"""Ahead-of-time compilation of the real train step for TPU topologies, on any host (no TPU needed).

``jax.experimental.topologies.get_topology_desc`` (libtpu, installed by the ``tpu`` extra) describes the chips of
a named slice; the Trainer's step is lowered from abstract shapes only (``Trainer.lower_train_step``) on a mesh of
those devices and compiled by the TPU compiler. The compiled executable's ``memory_analysis()`` gives the per-chip
bytes for arguments, outputs, temporaries and aliased (donated) buffers; ``MemoryReport`` compares their sum with
the chip's HBM. FLOPs are analytic (``ModelConfig.flops_per_token``): XLA's cost analysis counts a scanned loop
body once, so its raw figure undercounts a scanned layer stack.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from nanbeige_jax.model import ModelConfig
from nanbeige_jax.objectives.lm import make_lm_loss
from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
from nanbeige_jax.sharding import ShardingConfig, format_bytes
from nanbeige_jax.train.step import Trainer

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TopologySpec:
  """A named TPU slice: the libtpu topology string, its chip count, HBM and dense bf16 peak per chip."""
  name: str
  topology: str
  chips: int
  hbm_per_chip: int
  peak_flops_per_chip: float


TOPOLOGIES: dict[str, TopologySpec] = {t.name: t for t in (
    TopologySpec("v5e-4", "v5e:2x2", 4, 16 * GiB, 197e12),
    TopologySpec("v5e-8", "v5e:2x4", 8, 16 * GiB, 197e12),
    TopologySpec("v5e-16", "v5e:4x4", 16, 16 * GiB, 197e12),
    TopologySpec("v5p-8", "v5p:2x2x1", 4, 95 * GiB, 459e12),
    TopologySpec("v5p-16", "v5p:2x2x2", 8, 95 * GiB, 459e12),
    TopologySpec("v6e-4", "v6e:2x2", 4, 32 * GiB, 918e12),
    TopologySpec("v6e-8", "v6e:2x4", 8, 32 * GiB, 918e12),
    TopologySpec("v4-8", "v4:2x2x1", 4, 32 * GiB, 275e12),
)}


def get_topology(name: str) -> TopologySpec:
  if name not in TOPOLOGIES:
    raise ValueError(f"unknown TPU topology {name!r}; known: {sorted(TOPOLOGIES)}")
  return TOPOLOGIES[name]


def topology_devices(spec: TopologySpec) -> list[Any]:
  """The (abstract) TPU devices of a slice, from libtpu. Raises RuntimeError saying how to install libtpu."""
  # Compiling for a topology needs no TPU, no TPU metadata server and no exclusive libtpu lock.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise RuntimeError("AOT compilation for TPU topologies needs libtpu: pip install -e '.[tpu]' "
                       "(jax[tpu]==0.10.2, i.e. libtpu 0.0.42.*); it runs on a CPU host") from None
  from jax.experimental import topologies
  devices = list(topologies.get_topology_desc(spec.topology, "tpu").devices)
  return devices


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of a compiled step (``compiled.memory_analysis()``) against the chip's HBM."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int
  generated_code: int
  hbm: int
  # Set when the TPU compiler itself refused the program for lack of HBM (no memory analysis then): its message.
  refused: str | None = None

  @property
  def total(self) -> int:
    # Donated outputs reuse their argument buffers: count them once.
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

  @property
  def fits(self) -> bool:
    return self.refused is None and self.total <= self.hbm

  @property
  def over_by(self) -> int:
    return self.total - self.hbm

  def format(self) -> str:
    if self.refused is not None:
      return f"  the compiler ran out of HBM: {self.refused}"
    lines = [f"  arguments    {format_bytes(self.arguments):>11}   (params, optimizer state, batch)",
             f"  outputs      {format_bytes(self.outputs):>11}   ({format_bytes(self.aliased)} aliased to donated "
             f"arguments)",
             f"  temporaries  {format_bytes(self.temporaries):>11}   (activations, gradients, workspace)",
             f"  code         {format_bytes(self.generated_code):>11}",
             f"  total        {format_bytes(self.total):>11} of {format_bytes(self.hbm)} HBM per chip "
             f"({100 * self.total / self.hbm:.1f}%)"]
    return "\n".join(lines)


def memory_report(compiled: Any, hbm_per_device: int) -> MemoryReport:
  m = compiled.memory_analysis()
  return MemoryReport(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
                      temporaries=int(m.temp_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                      generated_code=int(m.generated_code_size_in_bytes), hbm=int(hbm_per_device))


def batch_shapes(global_batch: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract shapes of one LM batch (what ``nanbeige_jax.objectives.lm.make_lm_loss`` reads)."""
  i32 = lambda: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32)
  return {"inputs": i32(), "targets": i32(), "positions": i32(), "segment_ids": i32(),
          "loss_weights": jax.ShapeDtypeStruct((global_batch, seq_len), jnp.float32)}


def default_optimizer():
  """Full AdamW (clipping, decay mask) as trained: the optimizer state the memory figures include."""
  return make_optimizer(OptimizerConfig())


def build_trainer(model_cfg: ModelConfig, devices: list[Any], sharding: ShardingConfig, *, microbatches: int = 1,
                  vocab_chunk: int = 8192, tx: Any = None):
  mesh = sharding.make_mesh(devices=devices)
  return Trainer(model_cfg, tx if tx is not None else default_optimizer(), make_lm_loss(vocab_chunk=vocab_chunk),
                 mesh=mesh, rules=sharding.rules, microbatches=microbatches)


@dataclasses.dataclass(frozen=True)
class AotResult:
  topology: TopologySpec
  global_batch: int
  seq_len: int
  microbatches: int
  memory: MemoryReport
  flops_per_step: float
  devices: int
  compile_seconds: float

  @property
  def tokens_per_step(self) -> int:
    return self.global_batch * self.seq_len

  def step_seconds_at(self, mfu: float) -> float:
    return self.flops_per_step / (mfu * self.topology.peak_flops_per_chip * self.topology.chips)


def compile_for_topology(model_cfg: ModelConfig, topology: str | TopologySpec, *, global_batch: int, seq_len: int,
                         sharding: ShardingConfig | None = None, microbatches: int = 1, vocab_chunk: int = 8192,
                         devices: list[Any] | None = None, hbm_per_chip: int | None = None) -> AotResult:
  """Lower and compile the full train step (forward, backward, AdamW update) for ``topology``; nothing is
  allocated. ``devices`` overrides the topology's device list (to reuse one); ``hbm_per_chip`` the chip's HBM
  (e.g. to keep a reserve)."""
  spec = get_topology(topology) if isinstance(topology, str) else topology
  if hbm_per_chip is not None:
    spec = dataclasses.replace(spec, hbm_per_chip=int(hbm_per_chip))
  devices = devices if devices is not None else topology_devices(spec)
  sharding = sharding or ShardingConfig(rules="fsdp")
  trainer = build_trainer(model_cfg, devices, sharding, microbatches=microbatches, vocab_chunk=vocab_chunk)
  trainer.check_batch(global_batch)  # the trainer's own check: one error for both
  hbm_per_device = spec.hbm_per_chip * spec.chips // len(devices)
  t0 = time.perf_counter()
  try:
    compiled = trainer.lower_train_step(batch_shapes(global_batch, seq_len)).compile()
    memory = memory_report(compiled, hbm_per_device)
  except jax.errors.JaxRuntimeError as e:
    # Far over, the TPU compiler stops before a memory analysis exists ("RESOURCE_EXHAUSTED: Ran out of memory in
    # memory space hbm ..."): that is an answer (does not fit), not a crash.
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    detail = re.search(r"Ran out of memory[^\n]*", text)
    memory = MemoryReport(arguments=0, outputs=0, temporaries=0, aliased=0, generated_code=0, hbm=hbm_per_device,
                          refused=detail.group(0) if detail else text.splitlines()[0][:300])
  seconds = time.perf_counter() - t0
  flops = model_cfg.flops_per_token(seq_len) * global_batch * seq_len
  return AotResult(topology=spec, global_batch=global_batch, seq_len=seq_len, microbatches=microbatches,
                   memory=memory, flops_per_step=flops, devices=len(devices), compile_seconds=seconds)


def format_result(result: AotResult, model_cfg: ModelConfig) -> str:
  r = result
  lines = [f"AOT train step: {model_cfg.num_params() / 1e9:.2f}B params on {r.topology.name} "
           f"({r.devices} devices), global batch {r.global_batch} x seq {r.seq_len} = {r.tokens_per_step} "
           f"tokens/step, {r.microbatches} micro-batch(es), remat={model_cfg.remat_policy}, "
           f"attention={model_cfg.attention_impl}, compute {model_cfg.dtype}",
           f"compiled in {r.compile_seconds:.1f}s; memory per device:", r.memory.format(),
           f"model FLOPs/step: {r.flops_per_step:.3e} (analytic, {model_cfg.flops_per_token(r.seq_len):.3e} "
           f"per token); at 50% MFU a step takes {r.step_seconds_at(0.5):.2f}s on {r.topology.chips} chips"]
  if r.memory.fits:
    lines.append(f"FITS: {format_bytes(-r.memory.over_by)} of HBM left per device")
  elif r.memory.refused is not None:
    lines.append(f"DOES NOT FIT: the TPU compiler ran out of the {format_bytes(r.memory.hbm)} of HBM per device "
                 f"({r.memory.refused})")
  else:
    lines.append(f"DOES NOT FIT: needs {format_bytes(r.memory.total)} per device, "
                 f"{format_bytes(r.memory.over_by)} ({100 * r.memory.over_by / r.memory.hbm:.1f}%) over the "
                 f"{format_bytes(r.memory.hbm)} of HBM")
  return "\n".join(lines)
