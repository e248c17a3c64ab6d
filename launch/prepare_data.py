"""Tokenize sources once into ArrayRecord shards of token ids for ``PretrainConfig.data_backend = 'prepared'``.

  python launch/prepare_data.py --gin_file data/prepare_example.gin \
      --gin_param "PrepareConfig.output_dir = 'gs://bucket/prepared'"
  python launch/prepare_data.py --source 'web=jsonl:data/web/*.jsonl' --source 'code=jsonl:data/code/*.jsonl' \
      --tokenizer tokenizer.model --output_dir /mnt/prepared --num_workers 32

Multi-process (a pool of ``--num_workers``), resumable (run the same command again after a kill: finished shards
are kept, unfinished ones redone), with a progress bar; writes ``<output_dir>/<source>/<split>/`` on local disk or
any path-layer scheme (``gs://`` needs the ``gcs`` extra). Flags override the gin file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from nanbeige_jax.config import ConfigError, build, define_gin_flags, parse_gin  # noqa: E402

define_gin_flags([], "PrepareConfig.documents_per_shard=100000")
flags.DEFINE_multi_string("source", [], "A source as NAME=KIND:PATHS (PATHS a glob; e.g. web=jsonl:data/web/*.jsonl); "
                          "replaces PrepareConfig.sources.")
flags.DEFINE_string("tokenizer", None, "SentencePiece model (PrepareConfig.tokenizer_path).")
flags.DEFINE_string("output_dir", None, "Output root (PrepareConfig.output_dir).")
flags.DEFINE_integer("num_workers", None, "Tokenizer processes (PrepareConfig.num_workers; -1 all cores, 0 inline).")
flags.DEFINE_integer("documents_per_shard", None, "Documents per shard (PrepareConfig.documents_per_shard).")
flags.DEFINE_list("splits", None, "Splits to prepare (PrepareConfig.splits).")
flags.DEFINE_integer("max_shards", None, "Stop after this many new shards per split (run again to continue).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def _source_bindings(specs: list[str]) -> str:
  sources = {}
  for spec in specs:
    name, sep, rest = spec.partition("=")
    kind, sep2, pattern = rest.partition(":")
    if not (sep and sep2 and name and kind and pattern):
      raise app.UsageError(f"--source {spec!r}: expected NAME=KIND:PATHS")
    sources[name] = {"kind": kind, "paths": pattern}
  return f"PrepareConfig.sources = {sources!r}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from nanbeige_jax.data.prepare import PrepareConfig, prepare
  bindings = list(FLAGS.gin_param)
  if FLAGS.source:
    bindings.append(_source_bindings(FLAGS.source))
  for flag, field in (("tokenizer", "tokenizer_path"), ("output_dir", "output_dir"), ("num_workers", "num_workers"),
                      ("documents_per_shard", "documents_per_shard")):
    if FLAGS[flag].value is not None:
      bindings.append(f"PrepareConfig.{field} = {FLAGS[flag].value!r}")
  if FLAGS.splits is not None:
    bindings.append(f"PrepareConfig.splits = {tuple(FLAGS.splits)!r}")
  try:
    parse_gin(FLAGS.gin_file, bindings)
    config = build(PrepareConfig)
  except ConfigError as err:
    raise app.UsageError(str(err)) from None
  try:
    results = prepare(config, max_shards=FLAGS.max_shards, progress=FLAGS.progress)
  except ValueError as err:  # bad input (missing files, a different plan in output_dir, ...): one line, no traceback
    print(f"prepare_data: {err}", file=sys.stderr)
    sys.exit(1)
  unfinished = sorted(k for k, v in results.items() if v is None)
  if unfinished:
    print(f"stopped after --max_shards={FLAGS.max_shards}; unfinished: {', '.join(unfinished)} (run again to continue)")
  else:
    print(f"prepared {len(results)} source splits under {config.output_dir}")


if __name__ == "__main__":
  app.run(main)
