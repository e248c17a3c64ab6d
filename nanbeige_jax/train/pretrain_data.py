"""Pre-training data set-up: the configured sources, the tokenizer (loaded, or trained on the sources into the
workdir), the training batch stream of the configured backend (native ``MixtureIterator``, seqio, or ``prepared``:
``PreparedMixtureIterator`` over ``launch/prepare_data.py`` shards) and the held-out batches of one evaluation.
``cfg`` is a ``PretrainConfig`` (``nanbeige_jax.train.pretrain``). Every path goes through ``nanbeige_jax.paths``
(the workdir, ``data_root`` and ``prepared_root`` may be ``gs://...``)."""
from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import jax

from nanbeige_jax import paths
from nanbeige_jax.config import ConfigError
from nanbeige_jax.data.mixture import MixtureIterator
from nanbeige_jax.data.prepare import INDEX_FILE
from nanbeige_jax.data.prepared import PreparedMixtureIterator, PreparedSource
from nanbeige_jax.data.sources import build_source, source_kwargs
from nanbeige_jax.data.tokenizer import Tokenizer

log = logging.getLogger("nanbeige_jax.pretrain")


def build_sources(cfg: Any) -> dict[str, Any]:
  out = {}
  for name, spec in cfg.sources.items():
    kwargs = source_kwargs(spec, cfg.data_root)
    if spec["kind"] == "jsonl" and cfg.skip_bad_lines:
      kwargs.setdefault("skip_bad_lines", True)
    out[name] = build_source(spec["kind"], name, **kwargs)
    out[name].validate()
  return out


def prepared_sources(cfg: Any, names: list[str], split: str) -> dict[str, PreparedSource]:
  """``data_backend='prepared'``: split ``split`` of each source under ``<prepared_root>/<name>`` (only its index
  is read); ConfigError naming the path when a source was not prepared (or its preparation is unfinished)."""
  out = {}
  for name in names:
    directory = paths.join(cfg.prepared_root, name)
    if not paths.exists(paths.join(directory, split, INDEX_FILE)) and not paths.exists(
        paths.join(directory, INDEX_FILE)):
      raise ConfigError(f"PretrainConfig.prepared_root: no prepared {split!r} split of source {name!r}: "
                        f"{paths.join(directory, split, INDEX_FILE)} does not exist (run launch/prepare_data.py, "
                        f"or finish it: run it again)")
    try:
      out[name] = PreparedSource(directory, split)
    except ValueError as e:
      raise ConfigError(f"PretrainConfig.prepared_root: {e}") from None
  return out


def check_prepared_tokenizer(sources: dict[str, PreparedSource], tokenizer: Tokenizer) -> None:
  """ConfigError (pre-flight) when a prepared source was tokenized with another tokenizer."""
  for source in sources.values():
    try:
      source.check_tokenizer(tokenizer)
    except ValueError as e:
      raise ConfigError(f"{e} (PretrainConfig.tokenizer_path is {tokenizer.source!r})") from None


def load_configured_tokenizer(cfg: Any, workdir: paths.PathLike) -> Tokenizer | None:
  """The tokenizer named by the config or already in the workdir (read-only); None when one must be trained."""
  if cfg.tokenizer_path:
    return Tokenizer.load(cfg.tokenizer_path)
  path = paths.join(workdir, "tokenizer.model")
  return Tokenizer.load(path) if paths.exists(path) else None


def train_tokenizer(cfg: Any, sources: dict[str, Any], workdir: paths.PathLike) -> Tokenizer:
  """Train the default tokenizer on the sources into ``<workdir>/tokenizer.model`` (trained in a local temporary
  directory, then copied: atomically on local disk, one object upload elsewhere)."""
  path = paths.join(workdir, "tokenizer.model")
  texts: list[str] = []
  for name in sorted(sources):
    docs = sources[name].split_documents("train")
    step = max(1, len(docs) // cfg.tokenizer_train_docs)
    texts.extend(d[:20000] for d in docs[::step][: cfg.tokenizer_train_docs])
  with tempfile.TemporaryDirectory(prefix="nanbeige_tokenizer_") as local:
    tmp = os.path.join(local, "tokenizer")
    tok = Tokenizer.train(texts, tmp, cfg.tokenizer_vocab_size)
    paths.copy(f"{tmp}.model", path)
    if os.path.exists(f"{tmp}.vocab"):
      paths.copy(f"{tmp}.vocab", paths.join(workdir, "tokenizer.vocab"))
  log.info("trained a %d-piece tokenizer on %d documents -> %s", tok.vocab_size, len(texts), path)
  return Tokenizer.load(path)


def data_iterator_class(cfg: Any) -> type:
  """``MixtureIterator``, ``PreparedMixtureIterator`` (``data_backend='prepared'``) or, for ``'seqio'``,
  ``SeqioMixtureIterator`` (ConfigError without seqio)."""
  if cfg.data_backend == "prepared":
    return PreparedMixtureIterator
  if cfg.data_backend != "seqio":
    return MixtureIterator
  try:
    import seqio  # noqa: F401
    from nanbeige_jax.data.seqio_feed import SeqioMixtureIterator
  except ImportError:
    raise ConfigError("PretrainConfig.data_backend='seqio' needs the seqio extra: pip install -e '.[seqio]'") from None
  return SeqioMixtureIterator


def make_data_iterator(cfg: Any, sources: dict[str, Any], tokenizer: Tokenizer, names: list[str]) -> Any:
  """The training batch stream of ``cfg.data_backend`` (every backend has the same interface; ``sources`` are
  ``PreparedSource``s for ``prepared``)."""
  per_process = cfg.global_batch_size // jax.process_count()
  iterator_cls = data_iterator_class(cfg)
  return iterator_cls({n: sources[n] for n in names}, tokenizer, batch_size=per_process, seed=cfg.seed,
                      process_index=jax.process_index(), process_count=jax.process_count(), split="train")


def eval_batches(cfg: Any, data: Any, sources: dict[str, Any], tokenizer: Tokenizer,
                 names: list[str]) -> Any:
  """The held-out batches of one evaluation (the same every time). seqio: one pass over each task's validation
  split, at most ``eval_batches`` batches per source (``SeqioMixtureIterator.eval_batches``). native:
  ``eval_batches`` batches of the sources' eval splits under a uniform mixture (a fresh eval-split iterator)."""
  if cfg.data_backend == "seqio":
    return (batch for name in names for batch in data.eval_batches(name, cfg.seq_len, max_batches=cfg.eval_batches))
  if cfg.data_backend == "prepared":  # sources: the eval-split PreparedSources
    it = PreparedMixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=data.batch_size,
                                 seed=cfg.seed + 1, process_index=jax.process_index(),
                                 process_count=jax.process_count(), split="eval", prefetch=False)
    uniform = {n: 1.0 for n in names}
    return (it.next_batch(uniform, cfg.seq_len) for _ in range(cfg.eval_batches))
  it = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=data.batch_size, seed=cfg.seed + 1,
                       process_index=jax.process_index(), process_count=jax.process_count(), split="eval")
  uniform = {n: 1.0 for n in names}
  return (it.next_batch(uniform, cfg.seq_len) for _ in range(cfg.eval_batches))
