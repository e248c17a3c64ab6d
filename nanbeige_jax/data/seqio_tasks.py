"""The same document sources as seqio Tasks and a seqio Mixture (optional ``seqio`` extra: seqio + TensorFlow).

seqio and TensorFlow are imported lazily, inside the functions, so this module imports without them. Each source
becomes a Task named ``<prefix><source name>`` whose seqio splits ``train``/``validation`` are the source's
``train``/``eval`` splits; its ``targets`` feature is ``[bos] + tokens + [eos]`` with the given SentencePiece model,
like ``packing.document_sequence`` (seqio's feature converters then pack and shift). The native pipeline
(``mixture.MixtureIterator``) stays the one the trainer uses; this is an interop path for seqio-based tooling.
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
      del shuffle_files, seed  # seqio shuffles examples downstream; documents come in split order
      documents = _source.split_documents(SEQIO_SPLITS[split])
      return tf.data.Dataset.from_tensor_slices({"text": tf.constant(documents, dtype=tf.string)})

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
        preprocessors=[to_targets, seqio.preprocessors.tokenize, prepend_bos,
                       seqio.preprocessors.append_eos_after_trim],
        output_features={"targets": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)})
    task_names.append(task_name)
  if mixture_name is not None:
    names = list(sources)
    rates = validate_weights(weights if weights is not None else {n: 1.0 for n in names}, names)
    if overwrite:
      seqio.MixtureRegistry.remove(mixture_name)
    seqio.MixtureRegistry.add(mixture_name, [(t, float(r)) for t, r in zip(task_names, np.asarray(rates)) if r > 0])
  return task_names
