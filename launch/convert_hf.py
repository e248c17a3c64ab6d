"""Convert between Hugging Face Llama directories and this project's native parameter checkpoints.

  python launch/convert_hf.py --direction hf_to_native --src HF_DIR --dst CKPT_DIR [--dtype float32] [--step 0]
  python launch/convert_hf.py --direction native_to_hf --src CKPT_DIR --dst HF_DIR [--dtype bfloat16] \
      [--step N] [--max_shard_size 2GB]

``--dtype`` is the stored parameter dtype of the output: the native ``param_dtype`` for hf_to_native (default
float32), the safetensors dtype for native_to_hf (default bfloat16). ``--step``: the step the imported checkpoint is
saved under (default 0), or the step to export (default: the latest). The destination must not exist; it appears
complete or not at all.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("direction", None, ["hf_to_native", "native_to_hf"], "Conversion direction.", required=True)
flags.DEFINE_string("src", None, "Source directory.", required=True)
flags.DEFINE_string("dst", None, "Destination directory (must not exist).", required=True)
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Output dtype (default: float32 for hf_to_native, bfloat16 for native_to_hf).")
flags.DEFINE_integer("step", None, "hf_to_native: step to save under (default 0); native_to_hf: step to export "
                     "(default latest).", lower_bound=0)
flags.DEFINE_string("max_shard_size", "2GB", "native_to_hf: largest safetensors shard (e.g. 500MB, 2GB, 1GiB).")

IMPORT_STAGE = "hf_import"


def hf_to_native(src: str, dst: str, dtype: str, step: int) -> None:
  from nanbeige_jax import checkpoint, hf
  cfg, params = hf.load_hf_params(src, param_dtype=dtype)
  metadata = checkpoint.build_metadata(
      cfg, stage=IMPORT_STAGE,
      extra={"hf_source": str(Path(src).absolute()), "hf_config": hf.read_hf_config(src)})
  with hf.atomic_directory(dst) as tmp:
    checkpoint.save_params_checkpoint(str(tmp), params, metadata, step=step)
  print(f"imported {src} -> {dst} (step {step}, param_dtype {dtype}, {cfg.num_params():,} parameters)")


def native_to_hf(src: str, dst: str, dtype: str, step: int | None, max_shard_size: str) -> None:
  from nanbeige_jax import checkpoint, hf
  from nanbeige_jax.model import ModelConfig
  params, metadata = checkpoint.load_params_checkpoint(src, step=step)
  cfg = ModelConfig.from_dict(metadata["model_config"])
  files = hf.save_hf_dir(dst, cfg, params, dtype=dtype, max_shard_size=max_shard_size)
  print(f"exported {src} (step {'latest' if step is None else step}) -> {dst} ({len(files)} safetensors file(s), "
        f"{dtype})")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  from nanbeige_jax.hf import parse_size
  try:
    parse_size(FLAGS.max_shard_size)
  except ValueError as e:
    raise app.UsageError(f"--max_shard_size: {e}") from e
  from nanbeige_jax.checkpoint import CheckpointError
  from nanbeige_jax.hf import HFFormatError
  try:
    if FLAGS.direction == "hf_to_native":
      hf_to_native(FLAGS.src, FLAGS.dst, FLAGS.dtype or "float32", 0 if FLAGS.step is None else FLAGS.step)
    else:
      native_to_hf(FLAGS.src, FLAGS.dst, FLAGS.dtype or "bfloat16", FLAGS.step, FLAGS.max_shard_size)
  except (HFFormatError, CheckpointError, FileExistsError) as e:
    sys.exit(f"convert_hf: error: {e}")  # one line on stderr, exit status 1, nothing written


if __name__ == "__main__":
  sys.exit(app.run(main))
