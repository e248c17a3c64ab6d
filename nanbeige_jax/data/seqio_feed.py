"""Training batches from seqio Mixtures: the same interface as ``mixture.MixtureIterator`` (optional ``seqio`` extra).

``SeqioMixtureIterator(sources, tokenizer, batch_size=..., seed=..., process_index=..., process_count=...,
split=...)`` takes the sources as ``DocumentSource``s (registered as seqio Tasks ``<task_prefix><name>`` by
``seqio_tasks.register_tasks``) and/or as the names of already registered seqio Tasks whose ``targets`` feature uses
the same SentencePiece model. ``next_batch(weights, seq_len)`` returns the same fields as the native iterator.

Mixing. Each distinct ``(weights, seq_len)`` gets a seqio ``Mixture`` over the tasks with nonzero weight (registered
on first use as ``<task_prefix>mix_<hash of its rates>``, reused when it exists) and one seeded, infinite
``seqio.get_dataset(..., feature_converter=DecoderFeatureConverter(pack=True), batch_size=batch_size)`` stream.
seqio's rates are per example; the weights here mean shares of tokens, as in the native mixture, so with
``rate_unit="tokens"`` (default) a task's rate is ``weight / mean example length``, the mean measured once over its
first ``length_sample`` examples at that ``seq_len`` (realized token shares therefore match the weights up to that
estimate and sampling noise); ``rate_unit="examples"`` passes the weights through as seqio rates. A stream for a
weights dict seen before continues where it stopped; a new weights dict starts its own stream (its own shuffle of
every task), so, unlike the native iterator whose per-source cursors survive mixture changes, documents seen in an
earlier phase can recur in the next one.

Batch conventions. seqio's packed decoder features are ``decoder_target_tokens`` (the documents, packed: one segment
per example), ``decoder_input_tokens`` (the targets shifted right within each segment, 0 at every segment start),
``decoder_loss_weights`` (1 on non-padding targets), ``decoder_segment_ids`` (1.. per example, 0 on padding) and
``decoder_positions`` (restarting at 0 per segment). Ours are ``inputs[t]`` = the token and ``targets[t]`` = the
next token of the same document (``loss_weights`` 0 where none: each segment's last token, and padding). So
``inputs`` = ``decoder_target_tokens`` (``pad_id`` on padding) and ``targets`` = ``decoder_target_tokens`` shifted
left within the segment: the weighted ``(input, target)`` pairs are exactly the native pipeline's (seqio's extra
pair ``(0, bos)`` at each segment start is dropped; long documents are split with one token of overlap, see
``seqio_tasks``). The convention is checked on every batch (``decoder_rows``), so a seqio change fails loudly.
Unlike native rows, seqio's rows end with padding where the next example did not fit.

Per-source loss: seqio packs examples of different tasks into one row and its decoder feature converter keeps no
per-example feature, so ``source_ids`` is -1 everywhere in training batches: per-source training losses are not
available with this backend (the overall loss is). ``eval_batches(name, ...)`` reads one task, so its rows carry
that source's id.

Sharding. Process ``p`` of ``P`` reads ``seqio.ShardInfo(p, P)``: disjoint examples, ``batch_size`` rows each;
every process draws the same number of batches, so the state is identical on all processes.

State. ``tf.data`` iterators are not checkpointed; each stream is a deterministic function of ``(seed, weights,
seq_len, process shard)``, so the state records the batches drawn from each stream, and ``set_state`` re-creates a
stream lazily on its next use and skips that many batches (fast-forward time grows with the batches drawn). Exact
resume needs the same sources, tokenizer, seed, batch size and process count (checked).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from nanbeige_jax.data.mixture import ShardedBatchIterator, validate_weights
from nanbeige_jax.data.seqio_tasks import SEQIO_SPLITS, register_tasks
from nanbeige_jax.data.sources import DocumentSource, SourceLike, as_source
from nanbeige_jax.data.tokenizer import Tokenizer

STATE_FORMAT = "nanbeige_jax.data.SeqioMixtureIterator/v1"
RATE_UNITS = ("tokens", "examples")
_SPLIT_TO_SEQIO = {ours: theirs for theirs, ours in SEQIO_SPLITS.items()}
# task name -> (weak reference to the registered source, tokenizer fingerprint): re-registration is skipped for the
# same source object, so e.g. an eval iterator re-created at every evaluation reuses the tasks and their statistics.
_REGISTERED: dict[str, tuple[Any, str]] = {}
_MEAN_LENGTHS: dict[tuple[str, str, int, int], float] = {}  # (task, split, seq_len, sample) -> mean example tokens


def _require_seqio() -> tuple[Any, Any]:
  try:
    import seqio  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError("nanbeige_jax.data.seqio_feed needs the optional seqio extra: "
                      "pip install 'nanbeige-jax[seqio]'") from err
  # TensorFlow only feeds data here; keep it off accelerators so it does not reserve their memory under JAX.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialized: the devices can no longer change
    pass
  return seqio, tf


def decoder_rows(batch: Mapping[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
  """Packed ``DecoderFeatureConverter`` features -> our row fields (see the module docstring). Raises RuntimeError
  when the features do not follow seqio's documented packed-LM convention."""
  tokens = np.asarray(batch["decoder_target_tokens"], np.int32)
  segments = np.asarray(batch["decoder_segment_ids"], np.int32)
  positions = np.asarray(batch["decoder_positions"], np.int32)
  shifted_in = np.asarray(batch["decoder_input_tokens"], np.int32)
  valid = segments > 0
  starts = valid & (positions == 0)
  expected_in = np.zeros_like(tokens)
  expected_in[:, 1:] = tokens[:, :-1]
  expected_in[starts] = 0
  if not (np.array_equal(np.where(valid, shifted_in, 0), np.where(valid, expected_in, 0))
          and np.array_equal(np.asarray(batch["decoder_loss_weights"]) > 0, valid & (tokens != 0))
          and np.all(positions[~valid] == 0) and np.all(tokens[~valid] == 0)):
    raise RuntimeError("seqio's packed decoder features do not follow the convention this feed relies on "
                       "(decoder_input_tokens = decoder_target_tokens shifted right within each segment, 0 at "
                       "segment starts; loss weights on non-padding targets); check the installed seqio version")
  continues = np.zeros_like(valid)
  continues[:, :-1] = valid[:, :-1] & (segments[:, 1:] == segments[:, :-1])
  targets = np.zeros_like(tokens)
  targets[:, :-1] = np.where(continues[:, :-1], tokens[:, 1:], 0)
  return {"inputs": np.where(valid, tokens, pad_id).astype(np.int32), "targets": targets,
          "segment_ids": segments, "positions": np.where(valid, positions, 0).astype(np.int32),
          "loss_weights": continues.astype(np.float32)}


def _task_for_source(seqio: Any, name: str, source: DocumentSource, tokenizer: Tokenizer, prefix: str) -> str:
  task_name = f"{prefix}{name}"
  registered = _REGISTERED.get(task_name)
  if (registered is None or registered[0]() is not source or registered[1] != tokenizer.fingerprint()
      or task_name not in seqio.TaskRegistry.names()):
    register_tasks({name: source}, tokenizer.source, prefix=prefix, overwrite=True)
    _REGISTERED[task_name] = (weakref.ref(source), tokenizer.fingerprint())
    for key in [k for k in _MEAN_LENGTHS if k[0] == task_name]:
      del _MEAN_LENGTHS[key]
  return task_name


def _check_existing_task(seqio: Any, name: str, task_name: str, tokenizer: Tokenizer, split: str) -> str:
  try:
    task = seqio.TaskRegistry.get(task_name)
  except (ValueError, KeyError) as err:
    raise ValueError(f"source {name!r}: seqio task {task_name!r} is not registered") from err
  feature = task.output_features.get("targets")
  if feature is None:
    raise ValueError(f"source {name!r}: seqio task {task_name!r} has no 'targets' feature "
                     f"(found {sorted(task.output_features)})")
  vocabulary = feature.vocabulary
  if vocabulary.vocab_size != tokenizer.vocab_size or vocabulary.eos_id != tokenizer.eos_id:
    raise ValueError(f"source {name!r}: seqio task {task_name!r} uses a vocabulary of size {vocabulary.vocab_size} "
                     f"with eos {vocabulary.eos_id}, but the tokenizer has {tokenizer.vocab_size} and "
                     f"{tokenizer.eos_id}")
  if _SPLIT_TO_SEQIO[split] not in task.splits:
    raise ValueError(f"source {name!r}: seqio task {task_name!r} has no {_SPLIT_TO_SEQIO[split]!r} split "
                     f"(found {list(task.splits)})")
  return task_name


class _Stream:
  """One seeded seqio mixture stream: its numpy batch iterator, created lazily and fast-forwarded on restore."""

  def __init__(self, probabilities: dict[str, float], seq_len: int, batches: int = 0):
    self.probabilities = probabilities
    self.seq_len = seq_len
    self.batches = batches
    self.iterator: Iterator[dict[str, np.ndarray]] | None = None


class SeqioMixtureIterator(ShardedBatchIterator):
  """Packed, process-sharded batches from seqio Mixtures under a per-call mixture; same interface as
  ``mixture.MixtureIterator`` (see the module docstring for what differs).

  ``sources``: name -> DocumentSource / list of texts (registered as seqio Task ``<task_prefix><name>``) or -> the
  name of a registered seqio Task (its ``targets`` vocabulary must be ``tokenizer``'s). ``source_names`` is the dict
  order. ``batch_size`` is per process. ``split="train"`` shuffles (seeded) and repeats; ``"eval"`` reads each task's
  ``validation`` split in order, repeating.
  """

  def __init__(self, sources: Mapping[str, SourceLike | str], tokenizer: Tokenizer, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, split: str = "train",
               task_prefix: str = "nanbeige_", rate_unit: str = "tokens", length_sample: int = 256):
    if rate_unit not in RATE_UNITS:
      raise ValueError(f"rate_unit must be one of {RATE_UNITS}, got {rate_unit!r}")
    if length_sample <= 0:
      raise ValueError(f"length_sample must be > 0, got {length_sample}")
    if not os.path.isfile(str(tokenizer.source)):
      raise ValueError("SeqioMixtureIterator needs a tokenizer loaded from a SentencePiece model file "
                       f"(seqio.SentencePieceVocabulary reads it); this one's source is {tokenizer.source!r}")
    super().__init__(sources, tokenizer, batch_size=batch_size, seed=seed, process_index=process_index,
                     process_count=process_count, split=split)
    seqio, _ = _require_seqio()
    self.rate_unit = rate_unit
    self.length_sample = length_sample
    self.task_prefix = task_prefix
    self.task_names: dict[str, str] = {}
    for name, source in sources.items():
      if isinstance(source, str):
        self.task_names[name] = _check_existing_task(seqio, name, source, tokenizer, split)
      else:
        document_source = as_source(name, source)
        document_source.split_indices(split)  # loads and validates: empty/missing sources fail here, by name
        self.task_names[name] = _task_for_source(seqio, name, document_source, tokenizer, task_prefix)
    self._streams: dict[str, _Stream] = {}

  # ---- mixing -------------------------------------------------------------------------------------------------------
  @staticmethod
  def _stream_key(probabilities: Mapping[str, float], seq_len: int) -> str:
    return json.dumps({"seq_len": int(seq_len), "weights": dict(probabilities)}, sort_keys=True)

  def _mean_example_tokens(self, task_name: str, seq_len: int) -> float:
    key = (task_name, self.split, seq_len, self.length_sample)
    if key not in _MEAN_LENGTHS:
      seqio, _ = _require_seqio()
      dataset = seqio.get_mixture_or_task(task_name).get_dataset(
          sequence_length={"targets": seq_len}, split=_SPLIT_TO_SEQIO[self.split], shuffle=False, num_epochs=1)
      lengths = [len(example["targets"]) for example in dataset.take(self.length_sample).as_numpy_iterator()]
      if not lengths:
        raise ValueError(f"seqio task {task_name!r} has no {_SPLIT_TO_SEQIO[self.split]!r} examples")
      _MEAN_LENGTHS[key] = float(np.mean(lengths))
    return _MEAN_LENGTHS[key]

  def mixture_rates(self, probabilities: Mapping[str, float], seq_len: int) -> dict[str, float]:
    """seqio task name -> mixture rate for token shares ``probabilities`` (nonzero ones only; sum 1)."""
    rates = {}
    for name, probability in probabilities.items():
      if probability > 0:
        task_name = self.task_names[name]
        divisor = self._mean_example_tokens(task_name, seq_len) if self.rate_unit == "tokens" else 1.0
        rates[task_name] = probability / divisor
    total = sum(rates.values())
    return {task: round(rate / total, 12) for task, rate in rates.items()}

  def _mixture_name(self, rates: Mapping[str, float]) -> str:
    seqio, _ = _require_seqio()
    digest = hashlib.sha256(json.dumps(sorted(rates.items())).encode()).hexdigest()[:16]
    name = f"{self.task_prefix}mix_{digest}"
    if name not in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.add(name, list(rates.items()))
    return name

  def _open(self, stream: _Stream) -> Iterator[dict[str, np.ndarray]]:
    seqio, tf = _require_seqio()
    mixture = self._mixture_name(self.mixture_rates(stream.probabilities, stream.seq_len))
    key_seed = np.random.SeedSequence([self.seed, *self._stream_key(stream.probabilities, stream.seq_len).encode()])
    shard = seqio.ShardInfo(index=self.process_index, num_shards=self.process_count) if self.process_count > 1 else None
    dataset = seqio.get_dataset(
        mixture, task_feature_lengths={"targets": stream.seq_len}, dataset_split=_SPLIT_TO_SEQIO[self.split],
        shuffle=self.split == "train", num_epochs=None, seed=int(key_seed.generate_state(1)[0] % 2**31),
        shard_info=shard, feature_converter=seqio.DecoderFeatureConverter(pack=True), batch_size=self.batch_size)
    options = tf.data.Options()
    options.deterministic = True
    dataset = dataset.with_options(options)
    if stream.batches:
      dataset = dataset.skip(stream.batches)
    return dataset.as_numpy_iterator()

  def next_batch(self, weights: Mapping[str, float], seq_len: int) -> dict[str, np.ndarray]:
    """This process's ``(batch_size, seq_len)`` batch under ``weights`` (token shares per source name)."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
      raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    probabilities = dict(zip(self.source_names, (round(float(p), 12) for p in
                                                 validate_weights(weights, self.source_names))))
    key = self._stream_key(probabilities, seq_len)
    stream = self._streams.get(key)
    if stream is None:
      stream = self._streams[key] = _Stream(probabilities, int(seq_len))
    if stream.iterator is None:
      stream.iterator = self._open(stream)
    try:
      batch = next(stream.iterator)
    except StopIteration as err:
      raise ValueError(f"seqio mixture for weights {probabilities} yielded no batch on process {self.process_index} "
                       f"of {self.process_count} (split {self.split!r}): too few examples for the shards?") from err
    rows = decoder_rows(batch, self.tokenizer.pad_id)
    rows["source_ids"] = np.full_like(rows["inputs"], -1)  # unknown after seqio's cross-task packing
    stream.batches += 1
    self._batch_counter += 1
    return rows

  # ---- state --------------------------------------------------------------------------------------------------------
  def _identity(self) -> dict[str, Any]:
    return {"seed": self.seed, "split": self.split, "source_names": list(self.source_names),
            "tasks": [self.task_names[n] for n in self.source_names], "tokenizer": self.tokenizer.fingerprint(),
            "batch_size": self.batch_size, "process_count": self.process_count, "rate_unit": self.rate_unit,
            "length_sample": self.length_sample}

  def get_state(self) -> dict[str, Any]:
    """JSON-able state; identical on all processes."""
    streams = [{"seq_len": s.seq_len, "weights": dict(s.probabilities), "batches": s.batches}
               for s in self._streams.values() if s.batches]
    return {"format": STATE_FORMAT, **self._identity(), "batch_counter": self._batch_counter, "streams": streams}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores ``get_state()`` output; the following batches are exactly those after the saved point."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a SeqioMixtureIterator state (expected format {STATE_FORMAT!r}): "
                       f"{state.get('format') if isinstance(state, Mapping) else type(state).__name__!r}")
    for key, value in self._identity().items():
      if state.get(key) != value:
        raise ValueError(f"SeqioMixtureIterator state has {key}={state.get(key)!r} but this iterator has {value!r} "
                         "(exact resume needs the same value)")
    counter = state.get("batch_counter")
    if not isinstance(counter, int) or counter < 0:
      raise ValueError(f"SeqioMixtureIterator state batch_counter must be an int >= 0, got {counter!r}")
    entries = state.get("streams")
    if not isinstance(entries, list):
      raise ValueError(f"SeqioMixtureIterator state streams must be a list, got {entries!r}")
    streams: dict[str, _Stream] = {}
    for entry in entries:
      weights = entry.get("weights") if isinstance(entry, Mapping) else None
      seq_len = entry.get("seq_len") if isinstance(entry, Mapping) else None
      batches = entry.get("batches") if isinstance(entry, Mapping) else None
      if (not isinstance(weights, Mapping) or sorted(weights) != sorted(self.source_names)
          or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in weights.values())
          or not isinstance(seq_len, int) or seq_len < 2 or not isinstance(batches, int) or batches < 0):
        raise ValueError("SeqioMixtureIterator state stream must be {seq_len: int >= 2, weights: {source: share} "
                         f"over {self.source_names}, batches: int >= 0}}, got {entry!r}")
      probabilities = {name: float(weights[name]) for name in self.source_names}
      streams[self._stream_key(probabilities, seq_len)] = _Stream(probabilities, seq_len, batches)
    if sum(s.batches for s in streams.values()) != counter:
      raise ValueError(f"SeqioMixtureIterator state batch_counter {counter} != the batches of its streams "
                       f"{sum(s.batches for s in streams.values())}")
    self._streams = streams
    self._batch_counter = counter

  # ---- finite evaluation ---------------------------------------------------------------------------------------------
  def eval_batches(self, name: str, seq_len: int, *, max_batches: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over task ``name``'s ``validation`` split, packed by seqio, in order (not sharded by
    seqio: every process builds the global rows and takes its slice, as ``mixture.iter_eval_batches`` does). Every
    process yields the same number of batches; missing rows are padding (``source_ids`` -1)."""
    if name not in self.task_names:
      raise ValueError(f"unknown source {name!r}; known sources: {self.source_names}")
    seqio, _ = _require_seqio()
    dataset = seqio.get_dataset(
        self.task_names[name], task_feature_lengths={"targets": seq_len},
        dataset_split=_SPLIT_TO_SEQIO["eval"], shuffle=False, num_epochs=1,
        feature_converter=seqio.DecoderFeatureConverter(pack=True), batch_size=None)
    packed = list(dataset.as_numpy_iterator())
    if not packed:
      return
    rows = decoder_rows({k: np.stack([row[k] for row in packed]) for k in packed[0]}, self.tokenizer.pad_id)
    rows["source_ids"] = np.where(rows["segment_ids"] > 0, self.source_names.index(name), -1).astype(np.int32)
    global_batch = self.global_batch_size
    num_batches = -(-len(rows["inputs"]) // global_batch)
    if max_batches is not None:
      num_batches = min(num_batches, max_batches)
    missing = num_batches * global_batch - len(rows["inputs"])
    if missing > 0:
      padding = {"inputs": np.full((missing, seq_len), self.tokenizer.pad_id, np.int32),
                 "source_ids": np.full((missing, seq_len), -1, np.int32),
                 "loss_weights": np.zeros((missing, seq_len), np.float32)}
      for key in ("targets", "segment_ids", "positions"):
        padding[key] = np.zeros((missing, seq_len), np.int32)
      rows = {key: np.concatenate([rows[key], padding[key]]) for key in rows}
    for batch in range(num_batches):
      start = batch * global_batch + self.process_index * self.batch_size
      yield {key: value[start:start + self.batch_size] for key, value in rows.items()}
