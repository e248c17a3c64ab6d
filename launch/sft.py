"""Supervised fine-tuning of a checkpoint of this project (or an imported Hugging Face model) on chat data.

  python launch/sft.py                                         # tiny arithmetic SFT from runs/pretrain_tiny
  python launch/sft.py --gin_file sft/cold_start.gin --init_from runs/pretrain_3b --workdir runs/sft_cold_start \
      --gin_param "COLD_START_DATA = {'math': ['/data/math.jsonl'], 'science': [...], 'code': [...]}"
  python launch/sft.py --gin_file sft/overall.gin --init_from runs/sft_cold_start --workdir runs/sft_overall
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from nanbeige_jax import distributed  # noqa: E402
from nanbeige_jax.config import define_gin_flags, define_run_flags, run_flag_bindings  # noqa: E402

define_gin_flags(["sft/tiny_arithmetic.gin"], "SFTConfig.global_batch_size=32")
define_run_flags("runs/sft_tiny", "Run directory: checkpoints, metrics, tokenizer copy.")
flags.DEFINE_string("init_from", None, "A run directory or checkpoint directory of this project to start from "
                    "(params only; shorthand for SFTConfig.init_from).")
flags.DEFINE_integer("init_step", None, "Step of --init_from (default: latest).")
flags.DEFINE_string("init_hf", None, "A Hugging Face Llama directory to start from instead (SFTConfig.init_hf).")
flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the init run's tokenizer.model).")
distributed.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  from nanbeige_jax.train.stage import launch_stage
  from nanbeige_jax.train.sft import SFTConfig, run_sft
  bindings = list(FLAGS.gin_param)
  if FLAGS.init_from is not None and FLAGS.init_hf is not None:
    sys.exit("error: --init_from and --init_hf are mutually exclusive")
  if FLAGS.init_from is not None:
    bindings += [f"SFTConfig.init_from = {FLAGS.init_from!r}", "SFTConfig.init_hf = None"]
  if FLAGS.init_hf is not None:
    bindings += [f"SFTConfig.init_hf = {FLAGS.init_hf!r}", "SFTConfig.init_from = None"]
  if FLAGS.init_step is not None:
    bindings.append(f"SFTConfig.init_step = {FLAGS.init_step}")
  if FLAGS.tokenizer is not None:
    bindings.append(f"SFTConfig.tokenizer_path = {FLAGS.tokenizer!r}")
  bindings += run_flag_bindings("SFTConfig")
  launch_stage(SFTConfig, run_sft, FLAGS.gin_file, bindings, FLAGS.workdir, fresh=FLAGS.fresh)


if __name__ == "__main__":
  app.run(main)
