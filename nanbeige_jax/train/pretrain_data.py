"""Pre-training data set-up: the configured sources, the tokenizer (loaded, or trained on the sources into the
workdir), the training batch stream of the configured backend (native ``MixtureIterator`` or seqio) and the held-out
batches of one evaluation. ``cfg`` is a ``PretrainConfig`` (``nanbeige_jax.train.pretrain``)."""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any

import jax

from nanbeige_jax.config import ConfigError
from nanbeige_jax.data.mixture import MixtureIterator
from nanbeige_jax.data.sources import build_source
from nanbeige_jax.data.tokenizer import Tokenizer

log = logging.getLogger("nanbeige_jax.pretrain")


def build_sources(cfg: Any) -> dict[str, Any]:
  out = {}
  for name, spec in cfg.sources.items():
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    if cfg.data_root and "paths" in kwargs:
      paths = [kwargs["paths"]] if isinstance(kwargs["paths"], str) else list(kwargs["paths"])
      kwargs["paths"] = [p if os.path.isabs(p) else os.path.join(cfg.data_root, p) for p in paths]
    if spec["kind"] == "jsonl" and cfg.skip_bad_lines:
      kwargs.setdefault("skip_bad_lines", True)
    out[name] = build_source(spec["kind"], name, **kwargs)
    out[name].validate()
  return out


def load_configured_tokenizer(cfg: Any, workdir: pathlib.Path) -> Tokenizer | None:
  """The tokenizer named by the config or already in the workdir (read-only); None when one must be trained."""
  if cfg.tokenizer_path:
    return Tokenizer.load(cfg.tokenizer_path)
  path = workdir / "tokenizer.model"
  return Tokenizer.load(path) if path.exists() else None


def train_tokenizer(cfg: Any, sources: dict[str, Any], workdir: pathlib.Path) -> Tokenizer:
  """Train the default tokenizer on the sources into ``<workdir>/tokenizer.model`` (written atomically)."""
  path = workdir / "tokenizer.model"
  texts: list[str] = []
  for name in sorted(sources):
    docs = sources[name].split_documents("train")
    step = max(1, len(docs) // cfg.tokenizer_train_docs)
    texts.extend(d[:20000] for d in docs[::step][: cfg.tokenizer_train_docs])
  tmp = workdir / f".tokenizer.tmp.{os.getpid()}"
  tok = Tokenizer.train(texts, tmp, cfg.tokenizer_vocab_size)
  os.replace(f"{tmp}.model", path)
  if os.path.exists(f"{tmp}.vocab"):
    os.replace(f"{tmp}.vocab", workdir / "tokenizer.vocab")
  log.info("trained a %d-piece tokenizer on %d documents -> %s", tok.vocab_size, len(texts), path)
  return Tokenizer.load(path)


def data_iterator_class(cfg: Any) -> type:
  """``MixtureIterator`` or, for ``data_backend='seqio'``, ``SeqioMixtureIterator`` (ConfigError without seqio)."""
  if cfg.data_backend != "seqio":
    return MixtureIterator
  try:
    import seqio  # noqa: F401
    from nanbeige_jax.data.seqio_feed import SeqioMixtureIterator
  except ImportError:
    raise ConfigError("PretrainConfig.data_backend='seqio' needs the seqio extra: pip install -e '.[seqio]'") from None
  return SeqioMixtureIterator


def make_data_iterator(cfg: Any, sources: dict[str, Any], tokenizer: Tokenizer, names: list[str]) -> Any:
  """The training batch stream of ``cfg.data_backend`` (both backends have the same interface and state)."""
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
  it = MixtureIterator({n: sources[n] for n in names}, tokenizer, batch_size=data.batch_size, seed=cfg.seed + 1,
                       process_index=jax.process_index(), process_count=jax.process_count(), split="eval")
  uniform = {n: 1.0 for n in names}
  return (it.next_batch(uniform, cfg.seq_len) for _ in range(cfg.eval_batches))
