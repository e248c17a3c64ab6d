"""Convert between Hugging Face Llama directories and this project's native parameter checkpoints.

  python launch/convert_hf.py --direction hf_to_native --src HF_DIR --dst CKPT_DIR [--dtype float32] [--step 0]
  python launch/convert_hf.py --direction native_to_hf --src CKPT_DIR --dst HF_DIR [--dtype bfloat16] \
      [--step N] [--max_shard_size 2GB] [--tokenizer WORKDIR/tokenizer.model]

``--dtype`` is the stored parameter dtype of the output: the native ``param_dtype`` for hf_to_native (default
float32), the safetensors dtype for native_to_hf (default: the dtype recorded when the checkpoint was imported from
HF, else the parameters' own dtype, so the default round trip is lossless). ``--step``: the step the imported
checkpoint is saved under (default 0), or the step to export (default: the latest). The export writes the RoPE base
the checkpoint was trained at, the bos/eos/pad ids (``--tokenizer``, else those recorded at import, else
``CKPT_DIR/../tokenizer.model``) and a ``generation_config.json`` (``nanbeige_jax.hf_export``). The destination must
not exist; it appears complete or not at all.
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
                  "Output dtype (default: float32 for hf_to_native; for native_to_hf the dtype recorded at import, "
                  "else the parameters' dtype).")
flags.DEFINE_integer("step", None, "hf_to_native: step to save under (default 0); native_to_hf: step to export "
                     "(default latest).", lower_bound=0)
flags.DEFINE_string("max_shard_size", "2GB", "native_to_hf: largest safetensors shard (e.g. 500MB, 2GB, 1GiB).")
flags.DEFINE_string("tokenizer", None, "native_to_hf: tokenizer.model whose bos/eos/pad ids go into config.json and "
                    "generation_config.json (default: the ids recorded at import, else CKPT_DIR/../tokenizer.model).")

IMPORT_STAGE = "hf_import"


def hf_to_native(src: str, dst: str, dtype: str, step: int) -> None:
  from nanbeige_jax.hf_export import import_hf_dir
  cfg = import_hf_dir(src, dst, dtype=dtype, step=step, stage=IMPORT_STAGE)
  print(f"imported {src} -> {dst} (step {step}, param_dtype {dtype}, {cfg.num_params():,} parameters)")


def native_to_hf(src: str, dst: str, dtype: str | None, step: int | None, max_shard_size: str,
                 tokenizer: str | None) -> None:
  from nanbeige_jax.hf_export import export_checkpoint
  out = export_checkpoint(src, dst, dtype=dtype, step=step, max_shard_size=max_shard_size, tokenizer_path=tokenizer)
  print(f"exported {src} (step {'latest' if step is None else step}) -> {dst} ({len(out['files'])} safetensors "
        f"file(s), {out['dtype']}, rope_theta {out['rope_theta']:g}, token ids {out['token_ids'] or 'unknown'})")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  from nanbeige_jax.hf_export import parse_size
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
      native_to_hf(FLAGS.src, FLAGS.dst, FLAGS.dtype, FLAGS.step, FLAGS.max_shard_size, FLAGS.tokenizer)
  except (HFFormatError, CheckpointError, FileExistsError, ValueError) as e:
    sys.exit(f"convert_hf: error: {e}")  # one line on stderr, exit status 1, nothing written


if __name__ == "__main__":
  sys.exit(app.run(main))
