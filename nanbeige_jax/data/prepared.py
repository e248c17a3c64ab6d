"""Training batches from prepared shards (``launch/prepare_data.py``): grain reads, per-process rows, exact resume.

``PreparedMixtureIterator`` has the interface, batch keys, dtypes and per-row source draw of ``MixtureIterator``
(``next_batch(weights, seq_len)``, ``get_state``/``set_state``, ``eval_batches``), over sources prepared by
``nanbeige_jax.data.prepare`` instead of raw text.

A source's stream is its prepared documents (``[bos] + tokens + [eos]``, ``packing.document_sequence``) end to end:
the shards in an order reshuffled every epoch (seeded by the iterator's seed and the source's position; in index
order for ``split="eval"``), each shard's documents in their prepared (already shuffled) order. A packed row of
``seq_len`` is the next ``seq_len`` tokens of its source's stream, cut into pieces at document ends exactly as
``packing.fill_row`` cuts them, so a source's state is one integer: its token position in the stream.

Per process: the source of every global row comes from ``draw_row_sources`` (as in ``MixtureIterator``); the start
of a row is its source's position plus ``seq_len`` times the number of earlier rows of the batch drawn from the same
source (a vectorised count over the draw: a few integer ops per global row). Only this process's rows are located,
read and packed, so its reading and packing work does not depend on the number of processes. Records come from
grain's ``ArrayRecordDataSource`` of each shard: read in the building thread (``read_threads=0``, fastest from
local disk or page cache: ~40 records per 8 x 4096 batch), or with ``read_threads > 0`` through a grain
``MapDataset`` over the batch's records read by that many threads (high-latency mounts); with
``prefetch`` the next batch is built in a background thread while the caller trains on this one. A shard's
document lengths are loaded when a row first touches it; the ``max_open_shards`` most recently used shards per
source stay open (lengths and reader), so memory and file handles stay bounded over a 23T-token run.

ArrayRecord reads local files (or a FUSE mount such as gcsfuse, which keeps reads per record). A shard on another
scheme (``gs://``, ``memory://``) is copied whole to ``cache_dir`` when first touched: each process then downloads
every shard of the stream window all processes are reading, so mount the bucket at pod scale.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from nanbeige_jax import paths
from nanbeige_jax.data import packing
from nanbeige_jax.data.mixture import _SEED_SALT, ShardedBatchIterator, draw_row_sources, validate_weights
from nanbeige_jax.data.prepare import INDEX_FILE, INDEX_FORMAT, RECORD_DTYPE

STATE_FORMAT = "nanbeige_jax.data.PreparedMixtureIterator/v1"


class PreparedSource:
  """One prepared split of one source: ``directory`` is ``<output_dir>/<source>`` (then ``split`` picks the
  subdirectory) or the split directory itself (the one holding ``index.json``)."""

  def __init__(self, directory: str | os.PathLike, split: str = "train", *, cache_dir: str | None = None,
               max_open_shards: int = 32):
    directory = os.fspath(directory)
    if not paths.exists(paths.join(directory, INDEX_FILE)) and paths.exists(paths.join(directory, split, INDEX_FILE)):
      directory = paths.join(directory, split)
    index_path = paths.join(directory, INDEX_FILE)
    if not paths.exists(index_path):
      raise ValueError(f"prepared source {directory!r}: no {INDEX_FILE} (not prepared, or preparation unfinished: "
                       f"run launch/prepare_data.py again)")
    self.index = json.loads(paths.read_text(index_path))
    if self.index.get("format") != INDEX_FORMAT:
      raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected {INDEX_FORMAT!r}")
    if self.index["split"] != split:
      raise ValueError(f"{index_path}: split {self.index['split']!r}, expected {split!r}")
    if not self.index["shards"] or self.index["num_tokens"] <= 0:
      raise ValueError(f"{index_path}: the prepared split is empty")
    self.directory = directory
    self.name = self.index["source"]
    self.split = split
    self.shard_tokens = np.array([s["tokens"] for s in self.index["shards"]], np.int64)
    self.shard_documents = np.array([s["documents"] for s in self.index["shards"]], np.int64)
    self.total_tokens = int(self.shard_tokens.sum())
    self._cache_dir = cache_dir
    self.max_open_shards = max_open_shards
    self.shards_opened = 0  # readers created so far (shards entering the open set)
    self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
    self._records: OrderedDict[int, grain.MapDataset] = OrderedDict()
    self._readers: OrderedDict[int, Any] = OrderedDict()

  @property
  def num_shards(self) -> int:
    return len(self.shard_tokens)

  def offsets(self, shard: int) -> np.ndarray:
    """Start of every document of ``shard`` in the shard's tokens, plus the end: ``(documents + 1,)`` int64."""
    offsets = _lru_get(self._offsets, shard)
    if offsets is None:
      lengths_path = paths.join(self.directory, self.index["shards"][shard]["lengths"])
      lengths = np.load(io.BytesIO(paths.read_bytes(lengths_path)))
      if len(lengths) != self.shard_documents[shard] or int(lengths.sum()) != self.shard_tokens[shard]:
        raise ValueError(f"{self.directory}: shard {shard} lengths do not match {INDEX_FILE}")
      offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
      _lru_put(self._offsets, shard, offsets, self.max_open_shards)
    return offsets

  def data_source(self, shard: int) -> Any:
    """grain's ``ArrayRecordDataSource`` over the shard's file (copied to ``cache_dir`` first when not local; the
    copy is deleted when the shard leaves the open set)."""
    reader = _lru_get(self._readers, shard)
    if reader is None:
      path = paths.join(self.directory, self.index["shards"][shard]["file"])
      cached = None
      if not paths.is_local(path):
        if self._cache_dir is None:
          self._cache_dir = tempfile.mkdtemp(prefix="nanbeige_prepared_")
        path = cached = paths.local_copy(path, self._cache_dir)
      reader = grain.sources.ArrayRecordDataSource([os.fspath(path)])
      self.shards_opened += 1
      for _, (_, evicted_copy) in _lru_put(self._readers, shard, (reader, cached), self.max_open_shards):
        if evicted_copy is not None and os.path.exists(evicted_copy):
          os.unlink(evicted_copy)  # a copy of a remote shard: fetched again if ever needed
      self._records.pop(shard, None)
      return reader
    return reader[0]

  def records(self, shard: int) -> grain.MapDataset:
    """A grain MapDataset over the shard's records (bytes)."""
    dataset = _lru_get(self._records, shard)
    if dataset is None:
      dataset = grain.MapDataset.source(self.data_source(shard))
      _lru_put(self._records, shard, dataset, self.max_open_shards)
    return dataset

  def document(self, shard: int, doc: int) -> np.ndarray:
    return np.frombuffer(self.records(shard)[doc], RECORD_DTYPE).astype(np.int32)

  def documents(self, shard: int, docs: list[int]) -> list[np.ndarray]:
    """Several documents of one shard, read in this thread (ArrayRecord's batched ``__getitems__`` starts a thread
    pool per call: measured slower for the few records a batch needs per shard)."""
    reader = self.data_source(shard)
    return [np.frombuffer(reader[doc], RECORD_DTYPE).astype(np.int32) for doc in docs]

  def check_tokenizer(self, tokenizer: Any) -> None:
    found = {"tokenizer": self.index["tokenizer"], "bos_id": self.index["bos_id"], "eos_id": self.index["eos_id"]}
    expected = {"tokenizer": tokenizer.fingerprint(), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    for key, value in expected.items():
      if found[key] != value:
        raise ValueError(f"prepared source {self.directory!r} was tokenized with {key}={found[key]!r}, but the "
                         f"tokenizer has {value!r}: prepare it again with this tokenizer")


def _lru_get(cache: OrderedDict, key: int) -> Any:
  value = cache.get(key)
  if value is not None:
    cache.move_to_end(key)
  return value


def _lru_put(cache: OrderedDict, key: int, value: Any, capacity: int) -> list[tuple[int, Any]]:
  """Inserts and returns the evicted (least recently used) items."""
  cache[key] = value
  evicted = []
  while len(cache) > max(capacity, 1):
    evicted.append(cache.popitem(last=False))
  return evicted


class _Stream:
  """Token position -> (shard, document, offset) over a source's epochs of (reshuffled) shards."""

  def __init__(self, source: PreparedSource, seed: int, shuffle: bool):
    self.source, self.seed, self.shuffle = source, seed, shuffle
    self._epoch = -1
    self._order = np.arange(source.num_shards)
    self._ends = np.cumsum(source.shard_tokens)

  def order(self, epoch: int) -> np.ndarray:
    if self.shuffle and epoch != self._epoch:
      rng = np.random.default_rng([_SEED_SALT, self.seed, epoch])
      self._order = rng.permutation(self.source.num_shards)
      self._ends = np.cumsum(self.source.shard_tokens[self._order])
      self._epoch = epoch
    return self._order

  def pieces(self, start: int, length: int) -> list[tuple[int, int, int, int]]:
    """``(shard, doc, offset, take)`` pieces covering stream tokens ``[start, start + length)``."""
    epoch, within = divmod(start, self.source.total_tokens)
    order = self.order(epoch)
    slot = int(np.searchsorted(self._ends, within, side="right"))
    shard = int(order[slot])
    offsets = self.source.offsets(shard)
    within -= int(self._ends[slot] - self.source.shard_tokens[shard])
    doc = int(np.searchsorted(offsets, within, side="right")) - 1
    offset = within - int(offsets[doc])
    out = []
    while length > 0:
      take = min(int(offsets[doc + 1] - offsets[doc]) - offset, length)
      out.append((shard, doc, offset, take))
      length -= take
      doc, offset = doc + 1, 0
      if doc == len(offsets) - 1 and length > 0:
        slot += 1
        if slot == len(order):
          epoch, slot = epoch + 1, 0
          order = self.order(epoch)
        shard, doc = int(order[slot]), 0
        offsets = self.source.offsets(shard)
    return out


def rank_within_source(row_sources: np.ndarray, num_sources: int) -> tuple[np.ndarray, np.ndarray]:
  """For every global row, how many earlier rows of the batch have its source; and rows per source."""
  counts = np.bincount(row_sources, minlength=num_sources)
  order = np.argsort(row_sources, kind="stable")
  group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
  ranks = np.empty(len(row_sources), np.int64)
  ranks[order] = np.arange(len(row_sources)) - group_start[row_sources[order]]
  return ranks, counts


class PreparedMixtureIterator(ShardedBatchIterator):
  """Packed, process-sharded global batches from prepared sources under a per-call mixture.

  ``sources``: name -> prepared directory (``<output_dir>/<name>``) or ``PreparedSource``; the tokenizer must be
  the one the sources were prepared with. ``read_threads``: 0 reads a batch's records in the building thread
  (fastest on local disk); N > 0 reads them through a grain MapDataset with N threads (for high-latency mounts).
  ``prefetch``: build the next batch in a background thread (see ``next_batch``).
  """

  def __init__(self, sources: Mapping[str, str | os.PathLike | PreparedSource], tokenizer: Any, *, batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1, split: str = "train",
               read_threads: int = 0, prefetch: bool = True, cache_dir: str | None = None):
    super().__init__(sources, tokenizer, batch_size=batch_size, seed=seed, process_index=process_index,
                     process_count=process_count, split=split)
    if not isinstance(read_threads, int) or read_threads < 0:
      raise ValueError(f"PreparedMixtureIterator: read_threads must be an int >= 0, got {read_threads!r}")
    self.read_threads = read_threads
    self.prefetch = bool(prefetch)
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None
    self._pending: tuple[tuple, concurrent.futures.Future] | None = None
    self._sources: dict[str, PreparedSource] = {}
    self._streams: dict[str, _Stream] = {}
    for index, (name, source) in enumerate(sources.items()):
      if not isinstance(source, PreparedSource):
        source = PreparedSource(source, split, cache_dir=cache_dir)
      if source.split != split:
        raise ValueError(f"prepared source {name!r} is split {source.split!r}, this iterator reads {split!r}")
      source.check_tokenizer(tokenizer)
      self._sources[name] = source
      shuffle_seed = int(np.random.SeedSequence([_SEED_SALT, self.seed, index]).generate_state(1)[0])
      self._streams[name] = _Stream(source, shuffle_seed, split == "train")
    self._positions = {name: 0 for name in self.source_names}
    self._recent: dict[tuple[int, int, int], np.ndarray] = {}  # records of the last batch (long documents span it)

  # ---- reading -----------------------------------------------------------------------------------------------------
  def _read(self, keys: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], np.ndarray]:
    """Records by ``(source index, shard, doc)``; the previous batch's are reused (a long document spans batches).
    ``read_threads == 0``: read here, shard by shard; else a grain MapDataset over the keys read by threads."""
    found = {key: self._recent[key] for key in keys if key in self._recent}
    missing = [key for key in keys if key not in found]
    names = self.source_names
    if missing and self.read_threads == 0:
      by_shard: dict[tuple[int, int], list[int]] = {}
      for source_index, shard, doc in missing:
        by_shard.setdefault((source_index, shard), []).append(doc)
      for (source_index, shard), docs in by_shard.items():
        values = self._sources[names[source_index]].documents(shard, docs)
        found.update(((source_index, shard, doc), value) for doc, value in zip(docs, values))
    elif missing:
      def read(key: tuple[int, int, int]) -> np.ndarray:
        return self._sources[names[key[0]]].document(key[1], key[2])
      dataset = grain.MapDataset.source(missing).map(read)
      values = list(dataset.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                              prefetch_buffer_size=2 * self.read_threads)))
      found.update(zip(missing, values))
    self._recent = found
    return found

  def _build(self, probabilities: np.ndarray, seq_len: int, counter: int, positions: dict[str, int]
             ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """This process's rows of global batch ``counter`` from stream ``positions``, and the positions after it."""
    row_sources = draw_row_sources(probabilities, self.global_batch_size, self.seed, counter)
    ranks, counts = rank_within_source(row_sources, len(self.source_names))
    first_row = self.process_index * self.batch_size
    local_sources = row_sources[first_row:first_row + self.batch_size]
    plans = []
    for local_row, (source_index, rank) in enumerate(zip(local_sources.tolist(),
                                                        ranks[first_row:first_row + self.batch_size].tolist())):
      name = self.source_names[source_index]
      start = positions[name] + rank * seq_len
      plans.append((local_row, source_index, self._streams[name].pieces(start, seq_len)))
    keys = list(dict.fromkeys((s, shard, doc) for _, s, pieces in plans for shard, doc, _, _ in pieces))
    records = self._read(keys)
    rows = packing.empty_rows(self.batch_size, seq_len, self.tokenizer.pad_id)
    for local_row, source_index, pieces in plans:
      filled = 0
      for segment_id, (shard, doc, offset, take) in enumerate(pieces, start=1):
        packing.write_piece(rows, local_row, filled, records[(source_index, shard, doc)], offset, take, segment_id)
        filled += take
    rows["source_ids"] = np.where(rows["segment_ids"] > 0, local_sources[:, None], -1).astype(np.int32)
    after = {name: positions[name] + int(counts[i]) * seq_len for i, name in enumerate(self.source_names)}
    return rows, after

  def _take_pending(self, key: tuple) -> Any:
    """Waits for the batch built ahead (only one build runs at a time); its result if it was built for ``key``."""
    if self._pending is None:
      return None
    pending_key, future = self._pending
    self._pending = None
    try:
      result = future.result()
    except Exception:  # pylint: disable=broad-except
      return None  # rebuilt in the foreground, where the error (if real) is raised
    return result if pending_key == key else None

  def next_batch(self, weights: Mapping[str, float], seq_len: int) -> dict[str, np.ndarray]:
    """This process's ``(batch_size, seq_len)`` slice of the next global batch under ``weights``.

    With ``prefetch``, the following batch under the same weights and seq_len is built in a background thread
    while the caller trains on this one (used only if the next call asks for exactly that batch)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
      raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    seq_len = int(seq_len)
    probabilities = validate_weights(weights, self.source_names)
    key = (probabilities.tobytes(), seq_len, self._batch_counter, tuple(self._positions.items()))
    result = self._take_pending(key)
    if result is None:
      result = self._build(probabilities, seq_len, self._batch_counter, dict(self._positions))
    rows, self._positions = result
    self._batch_counter += 1
    if self.prefetch:
      if self._executor is None:
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prepared_prefetch")
      next_key = (key[0], seq_len, self._batch_counter, tuple(self._positions.items()))
      self._pending = (next_key, self._executor.submit(self._build, probabilities, seq_len, self._batch_counter,
                                                       dict(self._positions)))
    return rows

  def close(self) -> None:
    """Stops the prefetch thread (the iterator stays usable)."""
    self._take_pending(())
    if self._executor is not None:
      self._executor.shutdown(wait=True)
      self._executor = None

  # ---- state --------------------------------------------------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    """JSON-able state; identical on all processes."""
    return self._state(STATE_FORMAT, positions=dict(self._positions))

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores ``get_state()`` output; the following batches are exactly those after the saved point."""
    counter = self._checked_batch_counter(state, STATE_FORMAT)
    positions = state.get("positions")
    if not isinstance(positions, Mapping) or sorted(positions) != sorted(self.source_names):
      raise ValueError(f"PreparedMixtureIterator state positions must cover sources {self.source_names}, "
                       f"got {positions!r}")
    for name, value in positions.items():
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"PreparedMixtureIterator state position of {name!r} must be an int >= 0, got {value!r}")
    self._positions = {name: int(positions[name]) for name in self.source_names}
    self._take_pending(())  # a batch built ahead from the old state is dropped
    self._batch_counter = counter

  # ---- finite evaluation ---------------------------------------------------------------------------------------------
  def eval_batches(self, name: str, seq_len: int, *, max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over source ``name``'s documents in prepared order, packed with the last row padded;
    every process yields the same number of batches (missing rows are padding), process ``p`` its contiguous rows
    (as ``mixture.iter_eval_batches``)."""
    if name not in self._sources:
      raise ValueError(f"unknown source {name!r}; known sources: {self.source_names}")
    source = self._sources[name]
    documents = [source.document(shard, doc) for shard in range(source.num_shards)
                 for doc in range(int(source.shard_documents[shard]))]
    rows = packing.pack_sequences(documents, seq_len, self.tokenizer.pad_id)
    rows["source_ids"] = np.where(rows["segment_ids"] > 0, self.source_names.index(name), -1).astype(np.int32)
    global_batch = self.global_batch_size
    num_batches = -(-len(rows["inputs"]) // global_batch)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
    missing_rows = num_batches * global_batch - len(rows["inputs"])
    if missing_rows > 0:
      padding = packing.empty_rows(missing_rows, seq_len, self.tokenizer.pad_id)
      padding["source_ids"] = np.full_like(padding["inputs"], -1)
      rows = {key: np.concatenate([rows[key], padding[key]]) for key in rows}
    for batch in range(num_batches):
      start = batch * global_batch + self.process_index * self.batch_size
      yield {key: value[start:start + self.batch_size] for key, value in rows.items()}
