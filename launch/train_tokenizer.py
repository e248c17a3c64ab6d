"""Trains a SentencePiece tokenizer with the Nanbeige special tokens on files and/or built-in sources.

  python launch/train_tokenizer.py --input='corpus/*.txt' --input=docs.jsonl --builtin=shakespeare \
      --output=/tmp/tok/nanbeige --vocab_size=8000 --model_type=bpe

``.jsonl`` inputs are read as JSON Lines (``--jsonl_text_field``), ``.parquet`` as Parquet (``--parquet_text_column``),
anything else as plain UTF-8 text. Writes ``<output>.model`` and ``<output>.vocab`` and prints the vocab size,
fingerprint and the padded model vocab size.
"""
from __future__ import annotations

from absl import app, flags

from nanbeige_jax.data import sources as sources_lib
from nanbeige_jax.data.tokenizer import MODEL_TYPES, Tokenizer, padded_vocab_size

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("input", [], "Input files or globs (.txt/.jsonl/.parquet).")
flags.DEFINE_multi_enum("builtin", [], ["shakespeare", "python_stdlib", "arithmetic"], "Built-in sources to add.")
flags.DEFINE_string("output", None, "Output model prefix (writes <prefix>.model and <prefix>.vocab).")
flags.DEFINE_integer("vocab_size", 8000, "Vocabulary size.")
flags.DEFINE_enum("model_type", "bpe", list(MODEL_TYPES), "SentencePiece model type.")
flags.DEFINE_string("jsonl_text_field", "text", "Field holding the document in .jsonl inputs.")
flags.DEFINE_string("parquet_text_column", "text", "Column holding the document in .parquet inputs.")
flags.DEFINE_integer("max_documents_per_source", 0, "If > 0, use at most this many train documents per source.")
flags.DEFINE_integer("pad_multiple", 128, "Multiple used to report the padded model vocab size.")


def _source_for(pattern: str) -> sources_lib.DocumentSource:
  if pattern.endswith(".jsonl"):
    return sources_lib.JsonlSource(pattern, pattern, text_field=FLAGS.jsonl_text_field, eval_fraction=0.0)
  if pattern.endswith(".parquet"):
    return sources_lib.ParquetSource(pattern, pattern, text_column=FLAGS.parquet_text_column, eval_fraction=0.0)
  return sources_lib.TextFileSource(pattern, pattern, eval_fraction=0.0)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  if not FLAGS.input and not FLAGS.builtin:
    raise app.UsageError("give at least one --input or --builtin")
  sources = [_source_for(p) for p in FLAGS.input] + [sources_lib.build_source(b) for b in FLAGS.builtin]
  texts: list[str] = []
  for source in sources:
    indices = source.split_indices("train")  # validates: an empty source is an error naming it
    if FLAGS.max_documents_per_source > 0:
      indices = indices[:FLAGS.max_documents_per_source]
    texts.extend(source.document(int(i)) for i in indices)
    print(f"{source.describe()}: {len(indices)} documents")
  tokenizer = Tokenizer.train(texts, FLAGS.output, FLAGS.vocab_size, FLAGS.model_type)
  print(f"wrote {FLAGS.output}.model: vocab_size={tokenizer.vocab_size} fingerprint={tokenizer.fingerprint()} "
        f"padded_vocab_size={padded_vocab_size(tokenizer.vocab_size, FLAGS.pad_multiple)}")


if __name__ == "__main__":
  app.run(main)
