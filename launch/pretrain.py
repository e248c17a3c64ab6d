"""Pre-train a Nanbeige4-style model with the FG-WSD schedule.

  python launch/pretrain.py                                   # tiny model, built-in offline corpus, CPU-friendly
  python launch/pretrain.py --gin_file pretrain/nanbeige4_3b.gin --workdir gs://... --gin_param PretrainConfig.seed=1
  python launch/pretrain.py --gin_file pretrain/nanbeige4_3b.gin --dry_run [--topology v5p-8] [--mfu 0.4]

--dry_run validates and plans the whole run without data or accelerators (every phase, the sharding, an AOT compile
of the train step per distinct batch shape on a TPU topology); exit status 1 when a shape does not fit.
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
flags.DEFINE_bool("dry_run", False, "Validate and plan the run, AOT-compile its steps for --topology; train nothing.")
flags.DEFINE_string("topology", None, "TPU slice of the dry run (default: PretrainConfig.dry_run_topology).")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation the dry run's wall-clock estimates assume.")
FLAGS = flags.FLAGS


def dry_run(bindings):
  from nanbeige_jax.config import ConfigError
  from nanbeige_jax.train.dry_run import dry_run as plan
  from nanbeige_jax.train.pretrain import PretrainConfig, PretrainStage
  try:
    parse_gin(FLAGS.gin_file, bindings)
    cfg = build(PretrainConfig)
    result = plan(cfg, PretrainStage(), cfg.model_config(), topology=FLAGS.topology or cfg.dry_run_topology,
                  mfu=FLAGS.mfu)
  except (ConfigError, ValueError, RuntimeError) as e:
    sys.exit(f"error: {' '.join(str(e).split())}")
  print(result.text, flush=True)
  if not result.ok:
    sys.exit("dry run: a step does not fit on the topology (see the table)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  from nanbeige_jax.train.stage import launch_stage
  bindings = list(FLAGS.gin_param)
  bindings += run_flag_bindings("PretrainConfig")
  if FLAGS.dry_run:
    return dry_run(bindings)
  launch_stage(PretrainConfig, run_pretrain, FLAGS.gin_file, bindings, FLAGS.workdir, fresh=FLAGS.fresh)


if __name__ == "__main__":
  app.run(main)
