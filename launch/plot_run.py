"""Plot a run: python launch/plot_run.py --workdir runs/pretrain_tiny [--out loss.png]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from nanbeige_jax import paths  # noqa: E402
from nanbeige_jax.plot import plot_run  # noqa: E402

flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl (local or gs://...).", required=True)
flags.DEFINE_string("out", None, "Output PNG (default <workdir>/run.png).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  out = plot_run(paths.join(FLAGS.workdir, "metrics.jsonl"), FLAGS.out or paths.join(FLAGS.workdir, "run.png"))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
