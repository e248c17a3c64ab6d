"""Train-step benchmark: step time, tokens/s, model FLOPs/token, MFU and compiled memory for a preset/mesh/batch.

  python benchmarks/train_step.py --preset small --batch 8 --seq_len 256 [--steps 5] [--remat none]
      [--dtype float32] [--vocab_chunk 8192] [--sharding fsdp --gin_param 'ShardingConfig.fsdp = 1']
      [--torch / --notorch] [--set model.num_layers=4]

The step is the real one (``Trainer`` + ``make_lm_loss`` + AdamW with clipping), compiled ahead of time from
abstract shapes (that executable is the one timed, and its ``memory_analysis()`` is the compiled memory). MFU is
model FLOPs (``ModelConfig.flops_per_token``: 6N over matmul params + causal attention counted half) per second
over the peak: the device table (``nanbeige_jax.metrics.PEAK_FLOPS``) on accelerators; on CPU this machine's
measured matmul peak, and the same configuration's step in ``transformers`` (torch ``LlamaForCausalLM``, AdamW,
same batch and sequence, fp32) is timed in the same run for a speed ratio.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

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
class JaxResult:
  step_seconds: float
  compile_seconds: float
  memory: dict
  losses: list


def time_jax_step(cfg, sharding, batch_np, steps: int) -> JaxResult:
  import jax
  import jax.numpy as jnp
  from nanbeige_jax import aot
  from nanbeige_jax.train.lm import make_lm_loss
  from nanbeige_jax.train.loop import Trainer
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
  state = trainer.init_state(seed=0)
  batch = trainer.put_batch(batch_np)
  lr, theta = jax.device_put(jnp.float32(1e-3), trainer.replicated), jax.device_put(
      jnp.float32(cfg.rope_theta), trainer.replicated)
  state, metrics = compiled(state, batch, lr, theta)  # warm-up
  jax.block_until_ready(metrics["loss"])
  losses, times = [float(metrics["loss"])], []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, lr, theta)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
    losses.append(float(metrics["loss"]))
  return JaxResult(step_seconds=sorted(times)[len(times) // 2], compile_seconds=compile_s, memory=memory,
                   losses=losses)


def time_torch_step(cfg, batch_np, steps: int) -> float:
  """Median step time of transformers' LlamaForCausalLM (fp32, AdamW, clip 1.0) on the same batch."""
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

  def step():
    logits = model(input_ids=inputs).logits
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
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
        f"vocab_chunk={FLAGS.vocab_chunk}, {jax.device_count()} x {device.device_kind}; {info.describe()}",
        flush=True)
  peak = metrics.device_peak_flops(device)
  peak_note = "vendor peak"
  cpu_peaks = []
  measure_peak = on_cpu and FLAGS.peak
  if measure_peak:
    cpu_peaks.append(metrics.measure_cpu_peak_flops(n=2048, repeats=5))
  result = time_jax_step(cfg, sharding, batch, FLAGS.steps)
  if measure_peak:
    # Measured again after the step (and after torch below); the best is the peak, so a busy moment during
    # one measurement lowers MFU rather than inflating it.
    cpu_peaks.append(metrics.measure_cpu_peak_flops(n=2048, repeats=5))
    peak = max(cpu_peaks)
    peak_note = f"best measured fp32 2048^3 matmul of {len(cpu_peaks)} measurements"
  tok_s = tokens / result.step_seconds
  model_flops_s = flops_tok * tok_s
  print(f"jax:     step {result.step_seconds * 1e3:9.1f} ms  {tok_s:9.0f} tok/s  "
        f"model FLOPs/token {flops_tok:.3e}  achieved {model_flops_s / 1e9:.1f} GFLOP/s  "
        f"(compile {result.compile_seconds:.1f}s, losses {result.losses[0]:.3f} -> {result.losses[-1]:.3f})")
  mem = result.memory
  print(f"compiled memory: arguments {format_bytes(mem['arguments'])}, outputs {format_bytes(mem['outputs'])} "
        f"({format_bytes(mem['aliased'])} aliased), temporaries {format_bytes(mem['temporaries'])}")
  if peak:
    total_peak = peak * (1 if on_cpu else jax.device_count())
    print(f"MFU: {100 * model_flops_s / total_peak:.1f}% of {total_peak / 1e9:.1f} GFLOP/s ({peak_note})")
  if on_cpu and FLAGS.torch:
    torch_s = time_torch_step(cfg, batch, FLAGS.steps)
    torch_tok_s = tokens / torch_s
    if measure_peak:
      cpu_peaks.append(metrics.measure_cpu_peak_flops(n=2048, repeats=5))
      if max(cpu_peaks) > peak:
        peak = max(cpu_peaks)
        print(f"MFU (re-based on a higher later peak measurement): {100 * model_flops_s / peak:.1f}% of "
              f"{peak / 1e9:.1f} GFLOP/s")
    line = f"torch:   step {torch_s * 1e3:9.1f} ms  {torch_tok_s:9.0f} tok/s"
    if peak:
      line += f"  MFU {100 * flops_tok * torch_tok_s / peak:.1f}%"
    print(line)
    print(f"speed ratio jax/torch: {torch_s / result.step_seconds:.2f}x")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
