"""The same document sources as seqio Tasks and a seqio Mixture (optional ``seqio`` extra: seqio + TensorFlow).

seqio and TensorFlow are imported lazily, inside the functions, so this module imports without them. Each source
becomes a Task named ``<prefix><source name>`` whose seqio splits ``train``/``validation`` are the source's
``train``/``eval`` splits; its ``targets`` feature is ``[bos] + tokens + [eos]`` with the given SentencePiece model,
like ``packing.document_sequence`` (seqio's feature converters then pack and shift).

Long documents are split, not trimmed: when a ``sequence_length`` is given, a document of ``n > L`` tokens becomes
the pieces ``seq[k(L-1) : k(L-1) + L]``, consecutive pieces overlapping by one token. A piece's last token has no
in-piece target, and the next piece starts with it, so every next-token pair ``(seq[j], seq[j+1])`` of the document
is trainable exactly once: the same pairs as the native packer (``packing.fill_row``), which splits documents across
rows instead. (seqio's usual ``append_eos_after_trim`` would drop everything after ``L - 1`` tokens.)

With ``shuffle_files`` (seqio's ``shuffle=True``) a task's documents come in a seeded permutation, reshuffled every
epoch (``tf.data`` ``reshuffle_each_iteration``), before seqio's own shuffle buffer.

``seqio_feed.SeqioMixtureIterator`` feeds the trainer from these tasks through seqio Mixtures.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from nanbeige_jax.data.sources import SourceLike, as_source

SEQIO_SPLITS = {"train": "train", "validation": "eval"}


def _require_seqio() -> Any:
  try:
    import seqio  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError("nanbeige_jax.data.seqio_tasks needs the optional seqio extra: "
                      "pip install 'nanbeige-jax[seqio]'") from err
  return seqio


def split_long_targets(dataset: Any, sequence_length: Mapping[str, int] | None = None) -> Any:
  """seqio preprocessor: ``targets`` longer than ``sequence_length["targets"]`` (``L``) become the pieces
  ``targets[k(L-1) : k(L-1) + L]`` (one token of overlap, see the module docstring); other features are dropped.
  Without a sequence length the dataset is returned unchanged."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  length = None if not sequence_length else sequence_length.get("targets")
  if length is None:
    return dataset
  if int(length) < 2:
    raise ValueError(f"split_long_targets needs sequence_length['targets'] >= 2, got {length}")
  length, stride = int(length), int(length) - 1

  def pieces(example: Any) -> Any:
    targets = example["targets"]
    # ceil((n - 1) / stride) pieces cover the n - 1 next-token pairs of an n-token document (n >= 2: bos, eos).
    count = tf.maximum((tf.size(targets) - 2) // stride + 1, 1)
    starts = tf.range(count) * stride
    return tf.data.Dataset.from_tensor_slices(starts).map(lambda start: {"targets": targets[start:start + length]})
  return dataset.flat_map(pieces)


def register_tasks(sources: Mapping[str, SourceLike], tokenizer_model: str | os.PathLike, *,
                   prefix: str = "nanbeige_", mixture_name: str | None = None,
                   weights: Mapping[str, float] | None = None, overwrite: bool = True) -> list[str]:
  """Registers one seqio Task per source (and a Mixture when ``mixture_name`` is given); returns the task names.

  ``weights`` (source name -> rate) default to uniform; they are validated like the native mixture's.
  """
  seqio = _require_seqio()
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from nanbeige_jax.data.mixture import validate_weights  # pylint: disable=import-outside-toplevel
  from nanbeige_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel

  if not sources:
    raise ValueError("register_tasks needs at least one source")
  tokenizer = Tokenizer.load(tokenizer_model)
  vocabulary = seqio.SentencePieceVocabulary(str(tokenizer.source))
  bos_id = tokenizer.bos_id
  task_names: list[str] = []
  for name, source_like in sources.items():
    source = as_source(name, source_like)
    for split in SEQIO_SPLITS.values():
      source.split_indices(split)  # fail now, by name, on an empty source or split

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, _source=source) -> Any:
      documents = _source.split_documents(SEQIO_SPLITS[split])
      dataset = tf.data.Dataset.from_tensor_slices({"text": tf.constant(documents, dtype=tf.string)})
      if shuffle_files:  # a full permutation per epoch (seqio repeats this dataset), seeded when seqio has a seed
        dataset = dataset.shuffle(len(documents), seed=seed, reshuffle_each_iteration=True)
      return dataset

    @seqio.map_over_dataset
    def to_targets(example: Any) -> Any:
      return {"targets": example["text"]}

    @seqio.map_over_dataset
    def prepend_bos(example: Any) -> Any:
      targets = example["targets"]
      return {**example, "targets": tf.concat([tf.constant([bos_id], dtype=targets.dtype), targets], axis=0)}

    task_name = f"{prefix}{name}"
    if overwrite:
      seqio.TaskRegistry.remove(task_name)
    seqio.TaskRegistry.add(
        task_name,
        source=seqio.FunctionDataSource(dataset_fn, splits=tuple(SEQIO_SPLITS)),
        preprocessors=[to_targets, seqio.preprocessors.tokenize, prepend_bos, seqio.preprocessors.append_eos,
                       split_long_targets],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)})
    task_names.append(task_name)
  if mixture_name is not None:
    names = list(sources)
    rates = validate_weights(weights if weights is not None else {n: 1.0 for n in names}, names)
    if overwrite:
      seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add(mixture_name, [(t, float(r)) for t, r in zip(task_names, np.asarray(rates)) if r > 0])
  return task_names
