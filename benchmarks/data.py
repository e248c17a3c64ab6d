"""Prepared-data benchmark: tokens/s of one process reading packed batches from prepared shards, and its cost as the
simulated process count grows (target: flat), against what a v5p host consumes in the 3B step.

  python benchmarks/data.py [--seq_len 4096 --batch_size 8 --batches 8 --process_counts 1,2,4,8,16,32,64]

Writes a synthetic prepared corpus once (``--sources`` sources of ``--tokens_per_source`` random token ids each,
document lengths log-normal around ``--mean_doc_tokens``; ``prepare.write_prepared``) under ``--data_dir`` (default:
a temporary directory), then for each process count ``P`` builds a fresh ``PreparedMixtureIterator`` as process
``P - 1`` of ``P`` (the last process: its rows are the farthest into each source's stream) with ``--batch_size``
rows per process, reads one warm-up batch and times ``--batches`` batches under a uniform mixture (the median batch:
the figure is robust to other load on the machine). ``shard opens/batch``: shards entering a process's open set per
batch (an ArrayRecord open plus a lengths read each); it grows with the global batch over the shard size, which
is large here (a small corpus of small shards) and negligible at paper scale (100K-document shards). Each simulated
process reads and packs only its own rows, so the per-process time should not depend on ``P``. The shards sit on
local disk (in the page cache after writing): this measures the reader's CPU cost, not a remote store.

The consumption line: a v5p chip at ``--mfu`` of its 459 TFLOP/s bf16 peak processes ``mfu * peak /
flops_per_token(seq_len)`` tokens/s of Nanbeige4-3B (``ModelConfig.flops_per_token``); a v5p host has 4 chips (the
AOT table's v5p-8 batch of 172 x 4096 tokens per step is one host's); the ratio is the reader's tokens/s at the slowest
simulated process count over that.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("sources", 3, "Sources in the mixture.", lower_bound=1)
flags.DEFINE_integer("tokens_per_source", 8_000_000, "Synthetic tokens per source.", lower_bound=1000)
flags.DEFINE_integer("mean_doc_tokens", 1000, "Mean document length (log-normal, sigma 1).", lower_bound=1)
flags.DEFINE_integer("documents_per_shard", 2000, "Documents per shard.", lower_bound=1)
flags.DEFINE_integer("batch_size", 8, "Rows per process per batch.", lower_bound=1)
flags.DEFINE_integer("seq_len", 4096, "Row length.", lower_bound=2)
flags.DEFINE_integer("batches", 8, "Timed batches per process count (after one warm-up batch).", lower_bound=1)
flags.DEFINE_list("process_counts", ["1", "2", "4", "8", "16", "32", "64"], "Simulated process counts.")
flags.DEFINE_integer("read_threads", 0, "0: records read in the building thread; N: a grain MapDataset, N threads.",
                     lower_bound=0)
flags.DEFINE_bool("prefetch", False, "Build the next batch in a background thread (off: time the full cost).")
flags.DEFINE_string("data_dir", None, "Where to write the synthetic prepared corpus (default: a temporary dir).")
flags.DEFINE_float("mfu", 0.5, "Assumed MFU of the 3B step on v5p.")
flags.DEFINE_integer("v5p_batch", 172, "Rows per v5p host per step (the AOT table's v5p-8 batch).", lower_bound=1)

V5P_PEAK = 459e12
V5P_CHIPS_PER_HOST = 4


def _write_corpus(data_dir: str, tokenizer) -> list[str]:
  import numpy as np
  from nanbeige_jax.data.prepare import write_prepared
  rng = np.random.default_rng(0)
  names = []
  for s in range(FLAGS.sources):
    name = f"source{s}"
    names.append(name)
    documents, total = [], 0
    sigma = 1.0
    while total < FLAGS.tokens_per_source:
      length = max(1, int(rng.lognormal(np.log(FLAGS.mean_doc_tokens) - sigma**2 / 2, sigma)))
      documents.append(rng.integers(10, tokenizer.vocab_size, length, dtype=np.int32))
      total += length
    write_prepared(documents, tokenizer, data_dir, name, "train", documents_per_shard=FLAGS.documents_per_shard)
  return names


def main(argv):
  del argv
  import numpy as np
  from nanbeige_jax.data.prepared import PreparedMixtureIterator
  from nanbeige_jax.data.tokenizer import Tokenizer
  from nanbeige_jax.model.config import get_preset

  work = tempfile.mkdtemp(prefix="nanbeige_data_bench_")
  corpus = [f"tok {i} " + " ".join(str(j * i % 97) for j in range(40)) for i in range(400)]
  tokenizer = Tokenizer.train(corpus, os.path.join(work, "tok"), 280)  # ids only matter as a fingerprint
  data_dir = FLAGS.data_dir or os.path.join(work, "prepared")
  start = time.perf_counter()
  names = _write_corpus(data_dir, tokenizer)
  print(f"corpus: {FLAGS.sources} sources x {FLAGS.tokens_per_source:,} tokens, mean document "
        f"{FLAGS.mean_doc_tokens} tokens, {FLAGS.documents_per_shard} documents/shard "
        f"(written in {time.perf_counter() - start:.1f}s) at {data_dir}")
  weights = {name: 1.0 for name in names}
  print(f"per process: {FLAGS.batch_size} rows x {FLAGS.seq_len} tokens per batch, {FLAGS.batches} timed batches, "
        f"read_threads={FLAGS.read_threads}, prefetch={FLAGS.prefetch}; median time per batch")
  print(f"{'processes':>9} {'ms/batch':>10} {'tokens/s/process':>17} {'vs 1 process':>13} {'shard opens/batch':>18}")
  results = {}
  for count in (int(c) for c in FLAGS.process_counts):
    iterator = PreparedMixtureIterator({n: os.path.join(data_dir, n) for n in names}, tokenizer,
                                       batch_size=FLAGS.batch_size, seed=0, process_index=count - 1,
                                       process_count=count, read_threads=FLAGS.read_threads,
                                       prefetch=FLAGS.prefetch)
    iterator.next_batch(weights, FLAGS.seq_len)
    opened = sum(s.shards_opened for s in iterator._sources.values())  # pylint: disable=protected-access
    times = []
    for _ in range(FLAGS.batches):
      start = time.perf_counter()
      batch = iterator.next_batch(weights, FLAGS.seq_len)
      times.append(time.perf_counter() - start)
    iterator.close()
    sources = iterator._sources.values()  # pylint: disable=protected-access
    opens = (sum(s.shards_opened for s in sources) - opened) / FLAGS.batches
    elapsed = float(np.median(times))
    assert batch["inputs"].shape == (FLAGS.batch_size, FLAGS.seq_len)
    results[count] = FLAGS.batch_size * FLAGS.seq_len / elapsed
    relative = results[count] / results[min(results)]
    print(f"{count:>9} {elapsed * 1e3:>10.2f} {results[count]:>17,.0f} {relative:>12.2f}x {opens:>18.2f}", flush=True)
  model = get_preset("nanbeige4_3b")
  flops = model.flops_per_token(FLAGS.seq_len)
  per_chip = FLAGS.mfu * V5P_PEAK / flops
  per_host = per_chip * V5P_CHIPS_PER_HOST
  step_s = FLAGS.v5p_batch * FLAGS.seq_len / per_host
  reader = min(results.values())  # the slowest process count
  spread = max(results.values()) / min(results.values())
  print(f"v5p 3B step: flops_per_token({FLAGS.seq_len}) = {flops:.4g}; at {FLAGS.mfu:.0%} MFU of {V5P_PEAK / 1e12:.0f} "
        f"TFLOP/s a chip consumes {per_chip:,.0f} tokens/s, a host ({V5P_CHIPS_PER_HOST} chips, {FLAGS.v5p_batch} x "
        f"{FLAGS.seq_len} tokens per step, {step_s:.2f} s/step) {per_host:,.0f} tokens/s")
  print(f"reader / host consumption: {reader / per_host:.1f}x (slowest process count); slowest/fastest across "
        f"process counts: {spread:.2f}")
  shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
