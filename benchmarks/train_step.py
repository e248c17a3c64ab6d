"""Train-step benchmark: step time, tokens/s, model FLOPs/token, MFU and compiled memory for a preset/mesh/batch.

  python benchmarks/train_step.py --preset small --batch 8 --seq_len 256 [--steps 5] [--remat none]
      [--dtype float32] [--vocab_chunk 8192] [--sharding fsdp --gin_param 'ShardingConfig.fsdp = 1']
      [--torch / --notorch] [--set num_layers=4 --set scan_layers=false] [--nomalloc_settings]

  The CPU configuration of the README's figures: --set scan_layers=false --vocab_chunk 32768

The step is the real one (``Trainer`` + ``make_lm_loss`` + AdamW with clipping), compiled ahead of time from
abstract shapes (that executable is the one timed, and its ``memory_analysis()`` is the compiled memory). MFU is
model FLOPs (``ModelConfig.flops_per_token``: 6N over matmul params + causal attention counted half) per second
over the peak: the device table (``nanbeige_jax.metrics.PEAK_FLOPS``) on accelerators; on CPU this machine's
measured matmul peak (best of several measurements interleaved with the steps), and the same configuration's step
in ``transformers`` (torch ``LlamaForCausalLM``, AdamW, same batch and sequence, fp32) is timed in the same run, in
a child process, one JAX step and one torch step per round, for a speed ratio. The process restarts itself under
``nanbeige_jax.host_malloc.SETTINGS`` first (``--nomalloc_settings`` to compare without).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "small", "Model preset.")
flags.DEFINE_multi_string("set", [], "Model config overrides, e.g. --set num_layers=4 --set scan_layers=false.")
flags.DEFINE_integer("batch", 8, "Global batch (sequences).", lower_bound=1)
flags.DEFINE_integer("seq_len", 256, "Sequence length.", lower_bound=2)
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).", lower_bound=1)
flags.DEFINE_string("dtype", None, "Compute dtype override (float32/bfloat16); CPU default float32.")
flags.DEFINE_string("remat", "none", "Remat policy.")
flags.DEFINE_integer("vocab_chunk", 8192, "Cross-entropy vocabulary chunk.", lower_bound=1)
flags.DEFINE_integer("microbatches", 1, "Micro-batches per step.", lower_bound=1)
flags.DEFINE_string("sharding", "fsdp", "Sharding gin file under configs/sharding/.")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings (ShardingConfig.*).")
flags.DEFINE_boolean("torch", True, "On CPU: also time the transformers (torch) step.")
flags.DEFINE_boolean("peak", True, "On CPU: measure this machine's matmul peak.")
flags.DEFINE_boolean("malloc_settings", True,
                     "Restart under nanbeige_jax.host_malloc.SETTINGS (glibc keeps the step's temporaries mapped "
                     "between steps instead of page-faulting them in every step). Applies to the JAX and the "
                     "torch step alike: the torch child process inherits the environment.")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanbeige_jax import distributed  # noqa: E402

distributed.define_distributed_flags()


def _parse_value(text: str):
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def model_config():
  from nanbeige_jax.model import get_preset
  overrides = {}
  for item in FLAGS.set:
    if "=" not in item:
      raise ValueError(f"--set expects field=value, found {item!r}")
    key, value = item.split("=", 1)
    overrides[key.strip()] = _parse_value(value.strip())
  import jax
  on_cpu = jax.devices()[0].platform == "cpu"
  overrides.setdefault("dtype", FLAGS.dtype or ("float32" if on_cpu else "bfloat16"))
  overrides.setdefault("remat_policy", FLAGS.remat)
  return get_preset(FLAGS.preset, **overrides)


def make_batch(cfg, batch: int, seq_len: int, seed: int = 0):
  import numpy as np
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
          "segment_ids": np.ones((batch, seq_len), np.int32), "loss_weights": np.ones((batch, seq_len), np.float32)}


@dataclasses.dataclass
class JaxStep:
  run: Callable[[], float]  # one timed step -> its loss
  compile_seconds: float
  memory: dict


def make_jax_step(cfg, sharding, batch_np, warmup: int = 3) -> JaxStep:
  """The real train step (Trainer + LM loss + AdamW), compiled ahead of time from abstract shapes, warmed up with
  as many steps as the torch step gets (the first steps grow the heap)."""
  import jax
  import jax.numpy as jnp
  from nanbeige_jax import aot
  from nanbeige_jax.objectives.lm import make_lm_loss
  from nanbeige_jax.train.step import Trainer
  mesh = sharding.make_mesh()
  trainer = Trainer(cfg, aot.default_optimizer(), make_lm_loss(vocab_chunk=FLAGS.vocab_chunk), mesh=mesh,
                    rules=sharding.rules, microbatches=FLAGS.microbatches)
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch_np.items()}
  t0 = time.perf_counter()
  compiled = trainer.lower_train_step(shapes).compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  memory = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
  holder = {"state": trainer.init_state(seed=0)}
  batch = trainer.put_batch(batch_np)
  lr, theta = jax.device_put(jnp.float32(1e-3), trainer.replicated), jax.device_put(
      jnp.float32(cfg.rope_theta), trainer.replicated)

  def run() -> float:
    holder["state"], metrics = compiled(holder["state"], batch, lr, theta, {})  # no frozen models
    jax.block_until_ready((holder["state"], metrics))
    return float(metrics["loss"])

  for _ in range(warmup):
    run()
  return JaxStep(run=run, compile_seconds=compile_s, memory=memory)


def make_torch_step(cfg, batch_np, warmup: int = 3) -> Callable[[], float]:
  """transformers' LlamaForCausalLM (fp32, AdamW, clip 1.0) on the same batch, warmed up (a few steps: glibc's
  dynamic mmap threshold needs them to settle, and the first steps are measurably slower)."""
  import torch
  import torch.nn.functional as F
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=max(cfg.max_position_embeddings,
                                                                              batch_np["inputs"].shape[1]),
                       tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False)
  model = LlamaForCausalLM(hf_cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  inputs = torch.from_numpy(batch_np["inputs"]).long()
  targets = torch.from_numpy(batch_np["targets"]).long()

  def run() -> float:
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)

  for _ in range(warmup):
    run()
  return run


def _torch_worker(conn, cfg, batch_np) -> None:
  """Child process: build the torch step, then time one step per request until told to stop."""
  try:
    run = make_torch_step(cfg, batch_np)
    conn.send(("ready", None))
    while conn.recv() == "step":
      conn.send(("ok", timed(run)))
  except BaseException as e:  # report, don't hang the parent
    conn.send(("error", f"{type(e).__name__}: {e}"))


class TorchStepProcess:
  """The torch step in its own process, stepped on request: the two frameworks keep their own heaps (in one
  process, whichever runs second reuses pages the first one faulted in), while interleaving one JAX step with one
  torch step exposes both to the same moments of a shared machine. The child inherits the environment, so both
  run under the same allocator settings (``host_malloc.SETTINGS`` when active: they spare torch's large
  per-step tensors the same page faults)."""

  def __init__(self, cfg, batch_np, timeout_s: float = 1800.0):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    self.timeout_s = timeout_s
    self.conn, child = ctx.Pipe()
    self.proc = ctx.Process(target=_torch_worker, args=(child, cfg, batch_np), daemon=True)
    self.proc.start()
    self._receive()

  def _receive(self):
    if not self.conn.poll(self.timeout_s):
      self.close()
      raise TimeoutError(f"torch step process gave no answer within {self.timeout_s:.0f}s")
    kind, value = self.conn.recv()
    if kind == "error":
      self.close()
      raise RuntimeError(f"torch step process failed: {value}")
    return value

  def __call__(self) -> tuple[float, float]:
    self.conn.send("step")
    return self._receive()

  def close(self) -> None:
    try:
      self.conn.send("stop")
    except (BrokenPipeError, OSError):
      pass
    self.proc.join(timeout=30)
    if self.proc.is_alive():
      self.proc.kill()


def timed(fn: Callable[[], float]) -> tuple[float, float]:
  t0 = time.perf_counter()
  loss = fn()
  return time.perf_counter() - t0, loss


def median(xs: list[float]) -> float:
  return sorted(xs)[len(xs) // 2]


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  from nanbeige_jax import host_malloc
  if FLAGS.malloc_settings:
    host_malloc.reexec_with_malloc_settings()
  info = distributed.initialize_from_flags()
  import jax
  from nanbeige_jax import metrics
  from nanbeige_jax.config import build, parse_gin
  from nanbeige_jax.sharding import ShardingConfig, format_bytes
  cfg = model_config()
  parse_gin([f"sharding/{FLAGS.sharding}.gin"], FLAGS.gin_param)
  sharding = build(ShardingConfig)
  batch = make_batch(cfg, FLAGS.batch, FLAGS.seq_len)
  tokens = FLAGS.batch * FLAGS.seq_len
  flops_tok = cfg.flops_per_token(FLAGS.seq_len)
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  print(f"config: preset={FLAGS.preset} {cfg.num_params() / 1e6:.1f}M params (d={cfg.hidden_size}, "
        f"L={cfg.num_layers}, V={cfg.vocab_size}), batch {FLAGS.batch} x seq {FLAGS.seq_len} = {tokens} tokens, "
        f"dtype={cfg.dtype}, remat={cfg.remat_policy}, scan_layers={cfg.scan_layers}, "
        f"vocab_chunk={FLAGS.vocab_chunk}, {jax.device_count()} x {device.device_kind}; {info.describe()}; "
        f"malloc={'host_malloc.SETTINGS' if host_malloc.active() else 'default'}",
        flush=True)
  peak = metrics.device_peak_flops(device)
  peak_note = "vendor peak"
  measure_peak = on_cpu and FLAGS.peak
  with_torch = on_cpu and FLAGS.torch
  jax_step = make_jax_step(cfg, sharding, batch)
  torch_step = TorchStepProcess(cfg, batch) if with_torch else None
  # Interleaved rounds (jax step, torch step, matmul peak): a busy moment on a shared machine hits all three
  # alike instead of one framework's whole measurement.
  jax_times, torch_times, jax_losses, cpu_peaks = [], [], [], []
  for _ in range(FLAGS.steps):
    dt, loss = timed(jax_step.run)
    jax_times.append(dt)
    jax_losses.append(loss)
    if torch_step is not None:
      torch_times.append(torch_step()[0])
    if measure_peak:
      cpu_peaks.append(metrics.measure_cpu_peak_flops(n=2048, repeats=3))
  if torch_step is not None:
    torch_step.close()
  if measure_peak:
    # The best measurement is the peak, so a busy moment during one lowers MFU rather than inflating it.
    peak = max(cpu_peaks)
    peak_note = f"best of {len(cpu_peaks)} fp32 2048^3 matmul measurements, interleaved with the steps"
  step_s = median(jax_times)
  tok_s = tokens / step_s
  model_flops_s = flops_tok * tok_s
  print(f"jax:     step {step_s * 1e3:9.1f} ms  {tok_s:9.0f} tok/s  "
        f"model FLOPs/token {flops_tok:.3e}  achieved {model_flops_s / 1e9:.1f} GFLOP/s  "
        f"(median of {len(jax_times)}: {' '.join(f'{t * 1e3:.0f}' for t in jax_times)} ms; compile "
        f"{jax_step.compile_seconds:.1f}s; losses {jax_losses[0]:.3f} -> {jax_losses[-1]:.3f})")
  mem = jax_step.memory
  print(f"compiled memory: arguments {format_bytes(mem['arguments'])}, outputs {format_bytes(mem['outputs'])} "
        f"({format_bytes(mem['aliased'])} aliased), temporaries {format_bytes(mem['temporaries'])}")
  if peak:
    total_peak = peak * (1 if on_cpu else jax.device_count())
    print(f"MFU: {100 * model_flops_s / total_peak:.1f}% of {total_peak / 1e9:.1f} GFLOP/s ({peak_note})")
  if torch_times:
    torch_s = median(torch_times)
    torch_tok_s = tokens / torch_s
    line = (f"torch:   step {torch_s * 1e3:9.1f} ms  {torch_tok_s:9.0f} tok/s  (median of {len(torch_times)}: "
            f"{' '.join(f'{t * 1e3:.0f}' for t in torch_times)} ms)")
    if peak:
      line += f"  MFU {100 * flops_tok * torch_tok_s / peak:.1f}%"
    print(line)
    ratios = [t / j for t, j in zip(torch_times, jax_times)]  # in round order
    print(f"speed ratio jax/torch: {torch_s / step_s:.2f}x (per round: {' '.join(f'{r:.2f}' for r in ratios)})")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
