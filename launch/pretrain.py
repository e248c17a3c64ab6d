"""Pre-train a Nanbeige4-style model with the FG-WSD schedule.

  python launch/pretrain.py                                   # tiny model, built-in offline corpus, CPU-friendly
  python launch/pretrain.py --gin_file pretrain/nanbeige4_3b.gin --workdir gs://... --gin_param PretrainConfig.seed=1
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from nanbeige_jax import distributed  # noqa: E402
from nanbeige_jax.config import build, define_gin_flags, define_run_flags, parse_gin, run_flag_bindings  # noqa: E402

define_gin_flags(["pretrain/tiny.gin"], "PretrainConfig.global_batch_size=32")
define_run_flags("runs/pretrain_tiny", "Run directory: checkpoints, metrics, tokenizer, plot.")
distributed.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  import gin
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  from nanbeige_jax.train.stage import run_for_launcher
  bindings = list(FLAGS.gin_param)
  bindings += run_flag_bindings("PretrainConfig")

  def run():
    parse_gin(FLAGS.gin_file, bindings)
    return run_pretrain(build(PretrainConfig), FLAGS.workdir, fresh=FLAGS.fresh, operative_config=gin.config_str(),
                        sharding_report=True)
  run_for_launcher(run, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
