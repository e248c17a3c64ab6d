"""Evaluate a checkpoint: held-out perplexity per source and avg@k / pass@k on the arithmetic task.

  python launch/eval.py                                        # latest checkpoint of runs/pretrain_tiny
  python launch/eval.py --workdir runs/pretrain_tiny --step 400 --num_samples 3 --num_problems 32
  python launch/eval.py --gin_param EvalConfig.temperature=0.0 --gin_param EvalConfig.top_p=1.0
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from nanbeige_jax import distributed  # noqa: E402
from nanbeige_jax.config import ConfigError, build, define_gin_flags, parse_gin  # noqa: E402

define_gin_flags([], "EvalConfig.num_samples=3")
flags.DEFINE_string("workdir", None, "A launch/pretrain.py run directory (shorthand for EvalConfig.workdir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("num_problems", None, "Held-out problems per task.")
flags.DEFINE_integer("num_samples", None, "Samples per problem (k of avg@k / pass@k).")
flags.DEFINE_string("output", None, "Results JSON (default <workdir>/eval/step_<step>.json).")
distributed.define_distributed_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  distributed.initialize_from_flags()
  from nanbeige_jax.eval import EvalConfig, format_table, run_eval
  bindings = list(FLAGS.gin_param)
  for flag, field, quote in (("workdir", "workdir", True), ("step", "step", False),
                             ("num_problems", "num_problems", False), ("num_samples", "num_samples", False),
                             ("output", "output", True)):
    value = getattr(FLAGS, flag)
    if value is not None:
      bindings.append(f"EvalConfig.{field} = {value!r}" if quote else f"EvalConfig.{field} = {value}")
  try:
    parse_gin(FLAGS.gin_file, bindings)
    cfg = build(EvalConfig)
    results = run_eval(cfg)
  except (ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(format_table(results))
  print(f"\nresults: {results['output']}")


if __name__ == "__main__":
  app.run(main)
