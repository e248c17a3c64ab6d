"""Prepared data: launch/prepare_data.py end to end (pool of workers, interrupted then resumed without duplicates or
losses), the PreparedMixtureIterator (packing identical to packing.fill_row over the prepared stream, process
sharding equivalent to one process, exact resume, errors), the same on a non-local scheme, and the benchmark."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from nanbeige_jax import paths
from nanbeige_jax.data import packing
from nanbeige_jax.data import prepare as P
from nanbeige_jax.data import sources as S
from nanbeige_jax.data.prepared import PreparedMixtureIterator, PreparedSource
from nanbeige_jax.data.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights", "source_ids")
WORDS = ["sun", "moon", "star", "sky", "def", "return", "x", "=", "12", "+"]
SIZES = {"alpha": 45, "beta": 23}


def _write_corpus(root):
  os.makedirs(root, exist_ok=True)
  for name, count in SIZES.items():
    for part in range(2):
      with open(os.path.join(root, f"{name}-{part}.jsonl"), "w") as handle:
        for i in range(part, count, 2):
          words = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(2 + 13 * (i % 6)))
          handle.write(json.dumps({"text": f"{name} {i}: {words}"}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  _write_corpus(str(root / "raw"))
  texts = [json.loads(line)["text"] for f in sorted(os.listdir(root / "raw")) for line in open(root / "raw" / f)]
  Tokenizer.train(texts * 2, root / "tok", 300)
  return root


@pytest.fixture(scope="module")
def tokenizer(corpus):
  return Tokenizer.load(corpus / "tok.model")


def _launch(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), *args], env=env,
                        capture_output=True, text=True, timeout=300)


def _source_flags(corpus):
  return [f"--source=alpha=jsonl:{corpus}/raw/alpha-*.jsonl", f"--source=beta=jsonl:{corpus}/raw/beta-*.jsonl"]


@pytest.fixture(scope="module")
def prepared(corpus):
  """Prepared by the launcher in two runs: the first stops after 2 shards per split (as a killed run would, leaving
  a partial temporary shard), the second, with a pool of 2 workers, finishes."""
  out = str(corpus / "prepared")
  common = [*_source_flags(corpus), f"--tokenizer={corpus}/tok.model", f"--output_dir={out}",
            "--documents_per_shard=4", "--noprogress"]
  first = _launch(*common, "--num_workers=0", "--max_shards=2")
  assert first.returncode == 0, first.stderr
  assert "unfinished" in first.stdout
  assert not os.path.exists(os.path.join(out, "alpha", "train", "index.json"))
  assert len(os.listdir(os.path.join(out, "alpha", "train", "progress"))) == 3  # plan + 2 markers
  first_shard = os.path.join(out, "alpha", "train", "shard-00000-of-00011.array_record")
  kept = os.stat(first_shard).st_mtime_ns
  with open(os.path.join(out, "alpha", "train", ".shard-00002-of-00011.999.tmp"), "wb") as handle:
    handle.write(b"partial")  # what a kill in the middle of a shard leaves
  second = _launch(*common, "--num_workers=2")
  assert second.returncode == 0, second.stderr
  assert "prepared 4 source splits" in second.stdout
  assert os.stat(first_shard).st_mtime_ns == kept  # finished shards are not redone
  return out


def _source(corpus, name):
  return S.JsonlSource(name, f"{corpus}/raw/{name}-*.jsonl")


def _all_documents(source):
  return [source.document(s, d) for s in range(source.num_shards) for d in range(int(source.shard_documents[s]))]


# ---- prepare_data -------------------------------------------------------------------------------------------------
def test_prepare_resumed_run_holds_every_document_once_in_plan_order(prepared, corpus, tokenizer):
  for name in SIZES:
    raw = _source(corpus, name)
    for split in ("train", "eval"):
      prepared_source = PreparedSource(os.path.join(prepared, name), split)
      index = prepared_source.index
      order = P.document_order(raw, split, seed=0)
      expected = [packing.document_sequence(tokenizer.encode(raw.document(int(i))), tokenizer.bos_id,
                                            tokenizer.eos_id) for i in order]
      got = _all_documents(prepared_source)
      assert len(got) == len(expected) == index["num_documents"]
      for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
      assert index["num_tokens"] == sum(len(e) for e in expected)
      assert (index["source"], index["split"], index["tokenizer"]) == (name, split, tokenizer.fingerprint())
      assert [s["documents"] for s in index["shards"]] == [min(4, len(order) - 4 * k)
                                                           for k in range(-(-len(order) // 4))]
  assert not [f for f in os.listdir(os.path.join(prepared, "alpha", "train")) if f.endswith(".tmp")]
  assert sorted(P.document_order(_source(corpus, "alpha"), "train", 0)) == list(
      _source(corpus, "alpha").split_indices("train"))


def test_prepare_rerun_is_a_noop_and_a_different_plan_is_refused(prepared, corpus):
  index_path = os.path.join(prepared, "alpha", "train", "index.json")
  before = os.stat(index_path).st_mtime_ns
  again = _launch(*_source_flags(corpus), f"--tokenizer={corpus}/tok.model", f"--output_dir={prepared}",
                  "--documents_per_shard=4", "--noprogress", "--num_workers=0")
  assert again.returncode == 0, again.stderr
  assert os.stat(index_path).st_mtime_ns == before
  config = P.PrepareConfig(sources={"alpha": {"kind": "jsonl", "paths": f"{corpus}/raw/alpha-*.jsonl"}},
                           tokenizer_path=f"{corpus}/tok.model", output_dir=prepared, documents_per_shard=5,
                           num_workers=0)
  with pytest.raises(ValueError, match="documents_per_shard=4.*has 5"):
    P.prepare(config, progress=False)


def test_prepare_killed_while_publishing_a_shard_resumes_exactly(corpus, tokenizer, tmp_path, monkeypatch):
  """A crash between a shard's ArrayRecord file and its marker (fault injected into the lengths write) leaves a
  shard without marker: the next run redoes it, and every document is there once."""
  config = P.PrepareConfig(sources={"alpha": {"kind": "jsonl", "paths": f"{corpus}/raw/alpha-*.jsonl"}},
                           tokenizer_path=f"{corpus}/tok.model", output_dir=str(tmp_path / "out"),
                           documents_per_shard=5, num_workers=0, splits=("train",))
  real_write_bytes, calls = P.paths.write_bytes, []

  def crash_on_third(path, data, **kwargs):
    calls.extend([path] if str(path).endswith(".lengths.npy") else [])
    if len(calls) == 3:
      raise KeyboardInterrupt("killed")
    return real_write_bytes(path, data, **kwargs)
  monkeypatch.setattr(P.paths, "write_bytes", crash_on_third)
  with pytest.raises(KeyboardInterrupt):
    P.prepare(config, progress=False)
  monkeypatch.undo()
  split = tmp_path / "out" / "alpha" / "train"
  assert len(list(split.glob("shard-00002-of-*.array_record"))) == 1
  assert not (split / "progress" / "shard-00002.json").exists() and not (split / "index.json").exists()
  index = P.prepare(config, progress=False)["alpha/train"]
  raw = _source(corpus, "alpha")
  got = _all_documents(PreparedSource(str(tmp_path / "out" / "alpha"), "train"))
  assert [d[1:-1].tolist() for d in got] == [tokenizer.encode(raw.document(int(i)))
                                             for i in P.document_order(raw, "train", seed=0)]
  assert index["num_documents"] == len(got)


def test_prepare_array_record_source_with_spawned_workers(corpus, tokenizer, tmp_path):
  """ArrayRecord readers do not survive a fork: such sources go to spawned workers (a fork would crash them)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  texts = [f"record {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 5)) for i in range(30)]
  for part in range(2):
    writer = ArrayRecordWriter(str(tmp_path / f"r-{part}.array_record"), "group_size:1")
    for text in texts[part::2]:
      writer.write(text.encode())
    writer.close()
  out = str(tmp_path / "out")
  result = _launch(f"--source=rec=array_record:{tmp_path}/r-*.array_record", f"--tokenizer={corpus}/tok.model",
                   f"--output_dir={out}", "--documents_per_shard=4", "--num_workers=2", "--noprogress")
  assert result.returncode == 0, result.stderr
  raw = S.ArrayRecordSource("rec", f"{tmp_path}/r-*.array_record")
  for split in ("train", "eval"):
    got = _all_documents(PreparedSource(os.path.join(out, "rec"), split))
    expected = [tokenizer.encode(raw.document(int(i))) for i in P.document_order(raw, split, seed=0)]
    assert [d[1:-1].tolist() for d in got] == expected


def test_prepare_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"PrepareConfig.sources"):
    P.PrepareConfig(tokenizer_path="t", output_dir="o")
  with pytest.raises(ValueError, match=r"PrepareConfig.documents_per_shard"):
    P.PrepareConfig(sources={"a": {"kind": "jsonl"}}, tokenizer_path="t", output_dir="o", documents_per_shard=0)
  with pytest.raises(ValueError, match=r"PrepareConfig.splits"):
    P.PrepareConfig(sources={"a": {"kind": "jsonl"}}, tokenizer_path="t", output_dir="o", splits=("test",))
  result = _launch("--source=broken", "--tokenizer=t", "--output_dir=o")
  assert result.returncode != 0 and "NAME=KIND:PATHS" in result.stderr
  result = _launch("--source=a=jsonl:missing-*.jsonl", "--tokenizer=missing.model", "--output_dir=o")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "prepare_data: tokenizer model 'missing.model' does not exist" in result.stderr


# ---- the iterator -------------------------------------------------------------------------------------------------
def _iterator(prepared, tokenizer, **kwargs):
  kwargs.setdefault("batch_size", 6)
  kwargs.setdefault("seed", 5)
  return PreparedMixtureIterator({n: os.path.join(prepared, n) for n in SIZES}, tokenizer, **kwargs)


def _assert_same(a, b):
  for key in KEYS:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


PHASES = [({"alpha": 0.7, "beta": 0.3}, 24), ({"alpha": 0.7, "beta": 0.3}, 24), ({"alpha": 0.2, "beta": 0.8}, 40),
          ({"beta": 1.0}, 16), ({"alpha": 0.5, "beta": 0.5}, 40)]


def test_rows_are_fill_row_over_the_prepared_stream(prepared, tokenizer):
  iterator = _iterator(prepared, tokenizer, batch_size=5)
  rows = [iterator.next_batch({"beta": 1.0}, 32) for _ in range(40)]  # > 2 epochs of beta's train tokens
  assert iterator.get_state()["positions"]["beta"] == 40 * 5 * 32 > 2 * iterator._sources["beta"].total_tokens
  stream = iterator._streams["beta"]
  source = iterator._sources["beta"]
  documents = []
  for epoch in range(4):
    order = stream.order(epoch)
    assert sorted(order.tolist()) == list(range(source.num_shards))
    documents.extend(source.document(int(s), d) for s in order for d in range(int(source.shard_documents[s])))
  reference = packing.empty_rows(200, 32, tokenizer.pad_id)
  cursor, offset = 0, 0
  for row in range(200):
    cursor, offset = packing.fill_row(reference, row, 32, documents.__getitem__, cursor, offset)
  got = {key: np.concatenate([r[key] for r in rows]) for key in KEYS}
  for key in packing.ROW_FIELDS:
    np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
  assert (got["source_ids"] == 1).all() and got["loss_weights"].dtype == np.float32
  for key in KEYS[:-1]:
    assert rows[0][key].dtype == (np.float32 if key == "loss_weights" else np.int32)


def test_two_processes_together_equal_one(prepared, tokenizer):
  whole = _iterator(prepared, tokenizer, batch_size=6)
  halves = [_iterator(prepared, tokenizer, batch_size=3, process_index=p, process_count=2, prefetch=False)
            for p in range(2)]
  for weights, seq_len in PHASES:
    full = whole.next_batch(weights, seq_len)
    parts = [h.next_batch(weights, seq_len) for h in halves]
    _assert_same(full, {key: np.concatenate([p[key] for p in parts]) for key in KEYS})
  assert halves[0].get_state() == halves[1].get_state() == whole.get_state()
  counts = np.bincount(full["source_ids"][full["segment_ids"] > 0].ravel(), minlength=2)
  assert counts.sum() == 6 * 40


def test_exact_resume_in_a_fresh_iterator(prepared, tokenizer):
  reference = _iterator(prepared, tokenizer, process_index=1, process_count=2, read_threads=2)
  for weights, seq_len in PHASES[:2]:
    reference.next_batch(weights, seq_len)
  state = json.loads(json.dumps(reference.get_state()))
  expected = [reference.next_batch(w, s) for w, s in PHASES[2:]]
  resumed = _iterator(prepared, tokenizer, process_index=1, process_count=2, read_threads=0)
  resumed.set_state(state)
  for (weights, seq_len), batch in zip(PHASES[2:], expected):
    _assert_same(resumed.next_batch(weights, seq_len), batch)
  with pytest.raises(ValueError, match="seed"):
    _iterator(prepared, tokenizer, seed=6).set_state(state)
  with pytest.raises(ValueError, match="position of 'alpha'"):
    resumed.set_state({**state, "positions": {"alpha": -1, "beta": 0}})


def test_eval_split_and_eval_batches(prepared, tokenizer):
  iterator = _iterator(prepared, tokenizer, split="eval", batch_size=2)
  batch = iterator.next_batch({"alpha": 1.0}, 16)
  first = _all_documents(iterator._sources["alpha"])[0]
  np.testing.assert_array_equal(batch["inputs"][0][:min(16, len(first))], first[:16])
  batches = list(iterator.eval_batches("beta", 16))
  tokens = sum(len(d) for d in _all_documents(iterator._sources["beta"]))
  assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == tokens
  assert all(b["inputs"].shape == (2, 16) for b in batches)


def test_iterator_errors(prepared, tokenizer, corpus, tmp_path):
  other = Tokenizer.train(["completely different text here"] * 50 + ["zz yy xx"] * 50, tmp_path / "other", 290)
  with pytest.raises(ValueError, match="tokenized with tokenizer="):
    _iterator(prepared, other)
  with pytest.raises(ValueError, match="no index.json"):
    PreparedMixtureIterator({"alpha": str(tmp_path)}, tokenizer, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="seq_len"):
    _iterator(prepared, tokenizer).next_batch({"alpha": 1.0}, 1)
  with pytest.raises(ValueError, match="unknown sources"):
    _iterator(prepared, tokenizer).next_batch({"gamma": 1.0}, 8)


# ---- non-local scheme -----------------------------------------------------------------------------------------------
def test_prepare_and_read_on_the_memory_scheme(corpus, tokenizer, prepared, tmp_path):
  raw = "memory://nanbeige-test/raw"
  for name in os.listdir(corpus / "raw"):
    paths.copy(str(corpus / "raw" / name), f"{raw}/{name}")
  paths.copy(str(corpus / "tok.model"), f"{raw}/tok.model")
  out = "memory://nanbeige-test/prepared"
  config = P.PrepareConfig(sources={n: {"kind": "jsonl", "paths": f"{n}-*.jsonl"} for n in SIZES}, data_root=raw,
                           tokenizer_path=f"{raw}/tok.model", output_dir=out, documents_per_shard=4, num_workers=0)
  P.prepare(config, progress=False)
  assert paths.exists(f"{out}/alpha/train/index.json") and not os.path.exists("memory:")
  remote_sources = {n: PreparedSource(f"{out}/{n}", cache_dir=str(tmp_path / "cache"), max_open_shards=2)
                    for n in SIZES}
  remote = PreparedMixtureIterator(remote_sources, tokenizer, batch_size=6, seed=5)
  local = _iterator(prepared, tokenizer)
  for weights, seq_len in PHASES * 8:
    _assert_same(remote.next_batch(weights, seq_len), local.next_batch(weights, seq_len))
  remote.close()
  for name in SIZES:  # more shards were read than stay open
    assert remote.get_state()["positions"][name] > 3 * remote_sources[name].shard_tokens.max()
  assert 0 < len(os.listdir(tmp_path / "cache")) <= 4  # at most 2 shard copies per source are kept


# ---- benchmark ------------------------------------------------------------------------------------------------------
def test_benchmark_prints_flat_per_process_figures():
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "data.py"), "--tokens_per_source=20000",
                           "--mean_doc_tokens=200", "--documents_per_shard=20", "--batch_size=2", "--seq_len=256",
                           "--batches=2", "--process_counts=1,4,16", "--sources=2"],
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d,]+)\s+([\d.]+)x\s+([\d.]+)$", result.stdout, re.MULTILINE)
  assert [int(r[0]) for r in rows] == [1, 4, 16]
  assert all(float(r[1]) > 0 and int(r[2].replace(",", "")) > 0 for r in rows)
  consumption = re.search(r"a host \(4 chips, 172 x 256 tokens per step, [\d.]+ s/step\) ([\d,]+) tokens/s",
                          result.stdout)
  ratio = re.search(r"reader / host consumption: ([\d.]+)x", result.stdout)
  assert consumption and ratio and float(ratio.group(1)) > 0
