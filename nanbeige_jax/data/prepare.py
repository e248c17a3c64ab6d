"""Tokenize document sources once into ArrayRecord shards of token ids (``launch/prepare_data.py``).

Layout of one prepared source split, on local disk or any path-layer scheme (``nanbeige_jax.paths``)::

  <output_dir>/<source>/<split>/index.json                          written last: the split is complete
  <output_dir>/<source>/<split>/shard-00000-of-00012.array_record   one record per document
  <output_dir>/<source>/<split>/shard-00000-of-00012.lengths.npy    int32 token count of each record
  <output_dir>/<source>/<split>/progress/plan.json, shard-00000.json   resumption bookkeeping

A record is the document as packing expects it (``packing.document_sequence``: ``[bos] + tokens + [eos]``) as
little-endian int32. Documents of the split are put in a seeded random order (``train``; ``eval`` keeps the source
order) and cut into shards of ``documents_per_shard`` consecutive documents, so shard ``k``'s documents are a pure
function of the plan. A shard is tokenized by one worker of a process pool into a local file, then published: the
ArrayRecord file and its lengths are copied into place (atomic per file), then its ``progress/shard-k.json``
marker. A killed run resumes from the markers: a shard without a marker is redone from scratch (overwriting any
partial files), so no document is lost or written twice. ``index.json`` (shards with their documents and tokens,
tokenizer fingerprint, source name and split) is written when every shard has its marker.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nanbeige_jax import paths
from nanbeige_jax.config import gin_dataclass
from nanbeige_jax.data import packing
from nanbeige_jax.data.sources import SPLITS, DocumentSource, build_source, source_kwargs
from nanbeige_jax.data.tokenizer import Tokenizer

INDEX_FORMAT = "nanbeige_jax.prepared/v1"
INDEX_FILE = "index.json"
PROGRESS_DIR = "progress"
RECORD_DTYPE = np.dtype("<i4")
_ORDER_SALT = 0x70726570  # "prep"


@gin_dataclass
@dataclasses.dataclass(frozen=True)
class PrepareConfig:
  """What ``launch/prepare_data.py`` tokenizes. ``sources`` has the format of ``PretrainConfig.sources`` (name ->
  ``{'kind': ..., <source kwargs>}``; relative ``paths`` are under ``data_root``)."""
  sources: dict = dataclasses.field(default_factory=dict)
  tokenizer_path: str = ""
  output_dir: str = ""
  data_root: str = ""
  splits: tuple = SPLITS
  documents_per_shard: int = 50_000
  num_workers: int = -1  # -1: one per CPU core; 0: tokenize in this process
  seed: int = 0

  def __post_init__(self):
    if not isinstance(self.sources, Mapping) or not self.sources:
      raise ValueError(f"PrepareConfig.sources: expected a non-empty dict name -> spec, found {self.sources!r}")
    for name, spec in self.sources.items():
      if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ValueError(f"PrepareConfig.sources[{name!r}]: expected a dict with a 'kind', found {spec!r}")
    for field in ("tokenizer_path", "output_dir"):
      if not isinstance(getattr(self, field), str) or not getattr(self, field):
        raise ValueError(f"PrepareConfig.{field}: expected a path, found {getattr(self, field)!r}")
    bad = [s for s in self.splits if s not in SPLITS]
    if not self.splits or bad:
      raise ValueError(f"PrepareConfig.splits: expected a non-empty subset of {SPLITS}, found {self.splits!r}")
    if not isinstance(self.documents_per_shard, int) or self.documents_per_shard <= 0:
      raise ValueError(f"PrepareConfig.documents_per_shard: expected an int > 0, found {self.documents_per_shard!r}")
    if not isinstance(self.num_workers, int) or self.num_workers < -1:
      raise ValueError(f"PrepareConfig.num_workers: expected -1 (all cores), 0 or more, found {self.num_workers!r}")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"PrepareConfig.seed: expected an int >= 0, found {self.seed!r}")


def build_sources(config: PrepareConfig) -> dict[str, DocumentSource]:
  """The configured sources, relative ``paths`` resolved under ``data_root`` (any path-layer scheme)."""
  out = {}
  for name, spec in config.sources.items():
    kwargs = source_kwargs(spec, config.data_root)
    out[name] = build_source(spec["kind"], name, **kwargs)
  return out


def shard_name(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}"


def split_dir(output_dir: str, source: str, split: str) -> str:
  return paths.join(output_dir, source, split)


def document_order(source: DocumentSource, split: str, seed: int) -> np.ndarray:
  """The split's document indices in prepared order: a seeded permutation for ``train``, source order for eval."""
  indices = source.split_indices(split)
  if split != "train":
    return indices
  return indices[np.random.default_rng([_ORDER_SALT, seed]).permutation(len(indices))]


# ---- workers --------------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}  # each worker's source and tokenizer (inherited through fork, or sent to spawned ones)


def _tokenize_shard(task: tuple[int, list[int], str]) -> tuple[int, str, np.ndarray]:
  """Writes the documents ``doc_indices`` as one local ArrayRecord file; returns it and the records' lengths."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  shard, doc_indices, local_path = task
  source: DocumentSource = _WORKER["source"]
  tokenizer: Tokenizer = _WORKER["tokenizer"]
  lengths = np.empty(len(doc_indices), np.int32)
  writer = ArrayRecordWriter(local_path, "group_size:1")
  try:
    for start in range(0, len(doc_indices), 256):
      chunk = doc_indices[start:start + 256]
      for offset, ids in enumerate(tokenizer.encode_text_batch([source.document(i) for i in chunk])):
        sequence = packing.document_sequence(ids, tokenizer.bos_id, tokenizer.eos_id)
        writer.write(sequence.astype(RECORD_DTYPE, copy=False).tobytes())
        lengths[start + offset] = len(sequence)
  finally:
    writer.close()
  return shard, local_path, lengths


def _init_worker(model_proto: bytes, source: DocumentSource | None = None) -> None:
  _WORKER["tokenizer"] = Tokenizer.from_serialized(model_proto)
  if source is not None:
    _WORKER["source"] = source


# ---- one source split -----------------------------------------------------------------------------------------------
def _lengths_bytes(lengths: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, lengths.astype(np.int32), allow_pickle=False)
  return buffer.getvalue()


def prepare_split(source: DocumentSource, tokenizer: Tokenizer, output_dir: str, split: str, *,
                  documents_per_shard: int, num_workers: int = 0, seed: int = 0, max_shards: int | None = None,
                  progress: bool = True) -> dict[str, Any] | None:
  """Prepares one split of one source (resuming from its markers); returns the index, or None when ``max_shards``
  stopped it before every shard was done (run it again to continue)."""
  out = split_dir(output_dir, source.name, split)
  if paths.exists(paths.join(out, INDEX_FILE)):
    index = json.loads(paths.read_text(paths.join(out, INDEX_FILE)))
    _check_same_plan(out, index, tokenizer, documents_per_shard, seed)
    return index
  order = document_order(source, split, seed)
  num_shards = -(-len(order) // documents_per_shard)
  plan = {"format": INDEX_FORMAT, "source": source.name, "split": split, "tokenizer": tokenizer.fingerprint(),
          "documents_per_shard": documents_per_shard, "seed": seed, "num_documents": int(len(order)),
          "num_shards": num_shards}
  plan_path = paths.join(out, PROGRESS_DIR, "plan.json")
  if paths.exists(plan_path):
    _check_same_plan(out, json.loads(paths.read_text(plan_path)), tokenizer, documents_per_shard, seed,
                     num_documents=len(order))
  else:
    paths.write_text(plan_path, json.dumps(plan, indent=1))
  done = {}
  for k in range(num_shards):
    marker = paths.join(out, PROGRESS_DIR, f"shard-{k:05d}.json")
    if paths.exists(marker):
      done[k] = json.loads(paths.read_text(marker))
  todo = [k for k in range(num_shards) if k not in done]
  if max_shards is not None:
    todo = todo[:max_shards]
  bar = _progress_bar(progress, len(order), sum(d["documents"] for d in done.values()),
                      f"{source.name}/{split}")
  staging = out if paths.is_local(out) else tempfile.mkdtemp(prefix="nanbeige_prepare_")
  paths.mkdir(staging)
  if paths.is_local(out):  # partial shards of a killed run
    for stale in paths.glob(paths.join(out, ".shard-*.tmp")):
      os.unlink(stale)
  tasks = [(k, [int(i) for i in order[k * documents_per_shard:(k + 1) * documents_per_shard]],
            os.path.join(os.fspath(staging), f".{shard_name(k, num_shards)}.{os.getpid()}.tmp")) for k in todo]
  _WORKER["source"] = source
  try:
    for shard, local_path, lengths in _run_tasks(tasks, source, tokenizer, num_workers):
      done[shard] = _publish(out, shard, num_shards, local_path, lengths)
      if bar is not None:
        bar.update(len(lengths))
  finally:
    _WORKER.pop("source", None)
    if bar is not None:
      bar.close()
    if not paths.is_local(out):
      shutil.rmtree(staging, ignore_errors=True)
  if len(done) < num_shards:
    return None
  return _write_index(out, plan, tokenizer, source.kind, [done[k] for k in range(num_shards)])


def _publish(out: str, shard: int, num_shards: int, local_path: str, lengths: np.ndarray) -> dict[str, Any]:
  """Moves a finished local shard into ``out`` (file, lengths, then the marker) and returns its index entry."""
  name = shard_name(shard, num_shards)
  if paths.is_local(out):
    os.replace(local_path, os.fspath(paths.join(out, f"{name}.array_record")))
  else:
    paths.copy(local_path, paths.join(out, f"{name}.array_record"))
    os.unlink(local_path)
  paths.write_bytes(paths.join(out, f"{name}.lengths.npy"), _lengths_bytes(lengths))
  entry = {"file": f"{name}.array_record", "lengths": f"{name}.lengths.npy", "documents": int(len(lengths)),
           "tokens": int(lengths.sum(dtype=np.int64))}
  paths.write_text(paths.join(out, PROGRESS_DIR, f"shard-{shard:05d}.json"), json.dumps(entry))
  return entry


def _write_index(out: str, plan: Mapping[str, Any], tokenizer: Tokenizer, source_kind: str,
                 shards: list[dict[str, Any]]) -> dict[str, Any]:
  index = {**plan, "tokenizer_source": tokenizer.source, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
           "vocab_size": tokenizer.vocab_size, "record_dtype": "int32-le", "source_kind": source_kind,
           "num_tokens": int(sum(s["tokens"] for s in shards)), "shards": shards}
  paths.write_text(paths.join(out, INDEX_FILE), json.dumps(index, indent=1))
  return index


def write_prepared(documents: Sequence[Sequence[int]], tokenizer: Tokenizer, output_dir: str, name: str, split: str,
                   *, documents_per_shard: int) -> dict[str, Any]:
  """Writes already tokenized documents (ids without bos/eos, in the given order) as a prepared split, in this
  process (benchmarks, tests, corpora tokenized elsewhere); returns the index."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  out = split_dir(output_dir, name, split)
  num_shards = -(-len(documents) // documents_per_shard)
  plan = {"format": INDEX_FORMAT, "source": name, "split": split, "tokenizer": tokenizer.fingerprint(),
          "documents_per_shard": documents_per_shard, "seed": 0, "num_documents": len(documents),
          "num_shards": num_shards}
  staging = os.fspath(paths.mkdir(out)) if paths.is_local(out) else tempfile.mkdtemp(prefix="nanbeige_prepare_")
  shards = []
  try:
    for shard in range(num_shards):
      local_path = os.path.join(staging, f".{shard_name(shard, num_shards)}.{os.getpid()}.tmp")
      chunk = documents[shard * documents_per_shard:(shard + 1) * documents_per_shard]
      lengths = np.array([len(d) + 2 for d in chunk], np.int32)
      writer = ArrayRecordWriter(local_path, "group_size:1")
      for ids in chunk:
        writer.write(packing.document_sequence(ids, tokenizer.bos_id, tokenizer.eos_id).astype(RECORD_DTYPE).tobytes())
      writer.close()
      shards.append(_publish(out, shard, num_shards, local_path, lengths))
  finally:
    if not paths.is_local(out):
      shutil.rmtree(staging, ignore_errors=True)
  return _write_index(out, plan, tokenizer, "tokens", shards)


def _check_same_plan(out: str, plan: Mapping[str, Any], tokenizer: Tokenizer, documents_per_shard: int, seed: int,
                     num_documents: int | None = None) -> None:
  expected = {"format": INDEX_FORMAT, "tokenizer": tokenizer.fingerprint(), "documents_per_shard": documents_per_shard,
              "seed": seed}
  if num_documents is not None:
    expected["num_documents"] = int(num_documents)
  for key, value in expected.items():
    if plan.get(key) != value:
      raise ValueError(f"{out} holds a preparation with {key}={plan.get(key)!r}, this one has {value!r}: use another "
                       f"output_dir or delete it")


def _run_tasks(tasks: Sequence[tuple[int, list[int], str]], source: DocumentSource, tokenizer: Tokenizer,
               num_workers: int):
  """Yields finished shards (in completion order) from ``num_workers`` processes (0: this process).

  Workers are forked (they share the source's loaded documents) unless the source holds native readers that do
  not survive a fork (``DocumentSource.fork_safe``: ArrayRecord, TFDS): then they are spawned and get the source
  pickled, without its readers. A worker that dies fails the run (``BrokenProcessPool``) instead of hanging it.
  """
  if not tasks:
    return
  proto = tokenizer.serialized_model_proto()
  if num_workers == 0:
    _init_worker(proto)
    for task in tasks:
      yield _tokenize_shard(task)
    return
  if source.fork_safe:
    context, initargs = multiprocessing.get_context("fork"), (proto,)
  else:
    source.close_readers()
    context, initargs = multiprocessing.get_context("spawn"), (proto, source)
  with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=context,
                                              initializer=_init_worker, initargs=initargs) as pool:
    futures = [pool.submit(_tokenize_shard, task) for task in tasks]
    try:
      for future in concurrent.futures.as_completed(futures):
        yield future.result()
    finally:
      for future in futures:
        future.cancel()


def _progress_bar(enabled: bool, total: int, initial: int, name: str) -> Any:
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, desc=name, unit="doc", smoothing=0.1)


def prepare(config: PrepareConfig, *, max_shards: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Prepares every configured source and split; returns ``{"<source>/<split>": index or None}`` (None: stopped
  by ``max_shards``, which counts shards per split)."""
  tokenizer = Tokenizer.load(config.tokenizer_path)
  sources = build_sources(config)
  for source in sources.values():
    source.validate()  # load in the parent: forked workers share it
  workers = (os.cpu_count() or 1) if config.num_workers == -1 else config.num_workers
  results: dict[str, Any] = {}
  for name, source in sources.items():
    for split in config.splits:
      start = time.perf_counter()
      index = prepare_split(source, tokenizer, config.output_dir, split, documents_per_shard=config.documents_per_shard,
                            num_workers=workers, seed=config.seed, max_shards=max_shards, progress=progress)
      results[f"{name}/{split}"] = index
      if index is not None and progress:
        print(f"{name}/{split}: {index['num_documents']} documents, {index['num_tokens']} tokens, "
              f"{len(index['shards'])} shards ({time.perf_counter() - start:.1f}s) -> "
              f"{split_dir(config.output_dir, name, split)}", flush=True)
  return results
