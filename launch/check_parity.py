"""Logits parity between transformers' LlamaForCausalLM and our Decoder on one Hugging Face directory.

  python launch/check_parity.py --hf_dir DIR [--tolerance 1e-4] [--batch 2 --seq_len 32 --seed 0]

Both models load the directory's weights in fp32 (torch on CPU; ours with fp32 compute), run the same random
tokens, and the script prints max |logit diff| and argmax agreement. Exit status 0 when the max difference is
within ``--tolerance`` and every argmax agrees, 1 when it is not, 2 when the directory cannot be loaded.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("hf_dir", None, "Hugging Face Llama directory (config.json + safetensors).", required=True)
flags.DEFINE_float("tolerance", 1e-4, "Largest allowed max |logit difference| (>= 0).")
flags.DEFINE_integer("batch", 2, "Number of random token rows.", lower_bound=1)
flags.DEFINE_integer("seq_len", 32, "Tokens per row.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the random tokens.")
flags.register_validator("tolerance", lambda t: t >= 0, message="--tolerance must be >= 0")


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported
  from nanbeige_jax.hf import HFFormatError
  from nanbeige_jax.hf_parity import check_parity
  try:
    report = check_parity(FLAGS.hf_dir, batch=FLAGS.batch, seq_len=FLAGS.seq_len, seed=FLAGS.seed)
  except (HFFormatError, ValueError) as e:
    print(f"check_parity: error: {e}", file=sys.stderr, flush=True)
    return 2
  ok = report.passes(FLAGS.tolerance)
  print(f"{report}; tolerance {FLAGS.tolerance:.1e}: {'PASS' if ok else 'FAIL'}", flush=True)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(app.run(main))
