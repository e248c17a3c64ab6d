"""Compile the real train step for a TPU topology on this (CPU) host and report whether it fits.

  python launch/aot_compile.py --preset nanbeige4_3b --topology v5e-8 --global_batch 16 --seq_len 4096 \
      --remat full --attention splash [--sharding fsdp] [--microbatches 1] [--vocab_chunk 8192] \
      [--gin_param 'ShardingConfig.tensor = 2'] [--find_max_batch] [--print_sharding]

Prints per-device memory (arguments, outputs, temporaries, total vs the chip's HBM) and the analytic model FLOPs
per step. Exit status 0 when the step fits, 1 when it does not (the message says by how much), 2 on bad settings.
``--find_max_batch`` doubles the global batch from --global_batch while it fits, then bisects (in multiples of the
batch shards) to the largest batch that fits, and reports that one. Needs libtpu (``pip install -e '.[tpu]'``).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "nanbeige4_3b", "Model preset (nanbeige_jax.model.get_preset).")
flags.DEFINE_string("topology", "v5e-8", "Named TPU slice (nanbeige_jax.aot.TOPOLOGIES).")
flags.DEFINE_integer("global_batch", 16, "Global batch in sequences.", lower_bound=1)
flags.DEFINE_integer("seq_len", 4096, "Sequence length.", lower_bound=1)
flags.DEFINE_string("remat", None, "Remat policy (default: the preset's): none, full, save_dots, "
                    "save_dots_no_batch, save_qkv_out, save_out.")
flags.DEFINE_enum("attention", None, ["xla", "splash", "cudnn", "auto"], "Attention kernel (default: preset's).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"], "Parameter (and optimizer state) dtype.")
flags.DEFINE_boolean("scan_layers", True, "Scan the layer stack (False: unrolled).")
flags.DEFINE_integer("microbatches", 1, "Gradient-accumulation micro-batches per step.", lower_bound=1)
flags.DEFINE_integer("vocab_chunk", 8192, "Vocabulary chunk of the cross-entropy.", lower_bound=1)
flags.DEFINE_string("sharding", "fsdp", "Sharding gin file under configs/sharding/ (fsdp, fsdp_tp, dp, tp).")
flags.DEFINE_multi_string("gin_file", [], "Extra gin files (after --sharding).")
flags.DEFINE_multi_string("gin_param", [], "Gin bindings, e.g. 'ShardingConfig.tensor = 2'.")
flags.DEFINE_float("hbm_gib", None, "Override the chip's HBM in GiB (e.g. to keep a reserve).", lower_bound=0)
flags.DEFINE_boolean("find_max_batch", False, "Search the largest global batch that fits.")
flags.DEFINE_boolean("print_sharding", False, "Print the resolved-sharding report first.")


def _compile(cfg, sharding, batch):
  from nanbeige_jax import aot
  return aot.compile_for_topology(cfg, FLAGS.topology, global_batch=batch, seq_len=FLAGS.seq_len,
                                  sharding=sharding, microbatches=FLAGS.microbatches, vocab_chunk=FLAGS.vocab_chunk,
                                  devices=_devices(),
                                  hbm_per_chip=None if FLAGS.hbm_gib is None else int(FLAGS.hbm_gib * 2**30))


_DEVICES: list = []


def _devices():
  from nanbeige_jax import aot
  if not _DEVICES:
    _DEVICES.extend(aot.topology_devices(aot.get_topology(FLAGS.topology)))
  return _DEVICES


def find_max_batch(cfg, sharding, start: int, step: int):
  """Largest multiple of ``step`` that fits, starting at ``start``: double while it fits, then bisect."""
  from nanbeige_jax import aot
  results = {}

  def fits(batch):
    if batch not in results:
      results[batch] = _compile(cfg, sharding, batch)
      r = results[batch]
      need = "compiler out of HBM" if r.memory.refused else f"{aot.format_bytes(r.memory.total)} per device"
      print(f"  global batch {batch:5d}: {need} -> {'fits' if r.memory.fits else 'does not fit'}", flush=True)
    return results[batch].memory.fits

  lo, hi = None, start
  while fits(hi):
    lo, hi = hi, hi * 2
  if lo is None:
    return results[start]
  while hi - lo > step:
    mid = (lo + hi) // 2 // step * step
    if mid in (lo, hi):
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return results[lo]


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host only traces; the TPU compiler comes from libtpu
  from nanbeige_jax import aot
  from nanbeige_jax.config import ConfigError, build, parse_gin
  from nanbeige_jax.model import get_preset
  from nanbeige_jax.sharding import ShardingConfig, format_sharding_report
  try:
    aot.get_topology(FLAGS.topology)
    overrides = {"dtype": FLAGS.dtype, "param_dtype": FLAGS.param_dtype, "scan_layers": FLAGS.scan_layers}
    if FLAGS.remat:
      overrides["remat_policy"] = FLAGS.remat
    if FLAGS.attention:
      overrides["attention_impl"] = FLAGS.attention
    cfg = get_preset(FLAGS.preset, **overrides)
    parse_gin([f"sharding/{FLAGS.sharding}.gin", *FLAGS.gin_file], FLAGS.gin_param)
    sharding = build(ShardingConfig)
  except (ConfigError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    devices = _devices()
    if FLAGS.print_sharding:
      trainer = aot.build_trainer(cfg, devices, sharding, microbatches=FLAGS.microbatches,
                                  vocab_chunk=FLAGS.vocab_chunk)
      print(format_sharding_report(trainer), flush=True)
    if FLAGS.find_max_batch:
      mesh = sharding.make_mesh(devices=devices)
      batch_axes = [a for a, n in mesh.shape.items() if n > 1 and a in ("data", "fsdp")]
      step = FLAGS.microbatches
      for a in batch_axes:
        step *= mesh.shape[a]
      print(f"searching the largest global batch (multiples of {step}) on {FLAGS.topology}:", flush=True)
      result = find_max_batch(cfg, sharding, max(FLAGS.global_batch // step, 1) * step, step)
    else:
      result = _compile(cfg, sharding, FLAGS.global_batch)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(aot.format_result(result, cfg), flush=True)
  return 0 if result.memory.fits else 1


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(lambda argv: sys.exit(main(argv)))
