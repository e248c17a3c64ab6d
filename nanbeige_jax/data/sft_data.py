"""SFT data: chat conversations -> rendered ids + assistant-token loss weights -> packed rows, per-domain mixture.

A *chat source* is a list of conversations (``messages``: system/user/assistant turns, optional ``reasoning`` on
assistant turns) with a train and an eval split:

* ``jsonl``: one JSON object per line with a ``messages`` list (other fields, e.g. provenance, are ignored). Lines
  are indexed by byte offset once and parsed on access, so a large file is never held in memory; a bad line fails
  with ``path:line`` and what is wrong. A conversation is assigned to the eval split by a hash of its record's
  bytes (``eval_fraction``), so adding, removing or reordering files never moves a conversation between train and
  eval (identical records share a split).
* ``arithmetic``: the built-in task's problems as chats: user = question + ``ARITHMETIC_INSTRUCTION`` (the same
  prompt ``nanbeige_jax.eval`` asks at evaluation), assistant = the worked solution as ``reasoning`` (the
  ``<think>`` span) and the final ``The answer is N.`` line as ``content``. Train = the task's train split,
  eval = its held-out split.

Rendering (``render_conversation``) uses the Nanbeige chat template (``chat_template.render``); a conversation of
``n`` tokens occupies ``n`` positions of a row: ``inputs[t] = ids[t]``, ``targets[t] = ids[t+1]`` and
``loss_weights[t] = assistant_mask[t+1]`` (the weight belongs to the predicted token), so every token an assistant
turn produces, ``<think>`` span and ``<|im_end|>`` included, is learned and nothing else is. The last position has
no target (weight 0).

Packing (``pack_row``): whole conversations, next-fit, in stream order, each a segment (ids 1, 2, ...) with
positions restarting at 0, the row's tail padded (segment 0, weight 0); the model's ``segment_ids`` keep attention
inside each conversation. A conversation is never split across rows (a continuation would lose its prompt).
Overlong conversations are dropped (``overlong="drop"``, what a stage should use: a truncated assistant turn has
no ``<|im_end|>`` and would teach the model never to stop) or truncated to ``seq_len`` (``"truncate"``);
conversations with no assistant token left are dropped. Both are counted (``SFTMixtureIterator.stats``), as are conversations
whose message text writes chat markup such as ``<|im_end|>`` (``special_text``: rendered as plain text, never as
the control ids; see ``chat_template``).

``SFTMixtureIterator`` mirrors the pre-training ``MixtureIterator``: every row of the *global* batch draws its
source by systematic sampling under the per-call weights (``mixture.draw_row_sources``), each source is an
epoch-shuffled infinite stream, process ``p`` materialises rows ``[p * batch_size, (p + 1) * batch_size)``, and
the state (cursors + batch counter) is JSON and restores the exact continuation.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nanbeige_jax.data import chat_template
from nanbeige_jax.data.chat_sources import (ARITHMETIC_INSTRUCTION, CHAT_SOURCE_KINDS, ArithmeticChatSource,  # noqa: F401
                                            ChatSource, JsonlChatSource, arithmetic_messages, build_chat_source,
                                            content_fraction, parse_chat_record)
from nanbeige_jax.data.mixture import EpochShuffledIndices, ShardedBatchIterator, draw_row_sources, validate_weights

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights", "source_ids")
OVERLONG_POLICIES = ("truncate", "drop")
STATE_FORMAT = "nanbeige_jax.data.SFTMixtureIterator/v1"
_SEED_SALT = 0x73667464  # "sftd"


# ----------------------------------------------------------------------------------------------------------------
# Rendering and packing
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Conversation:
  ids: np.ndarray       # int32 (n,)
  weights: np.ndarray   # float32 (n,): weights[t] = assistant_mask[t + 1]; weights[-1] = 0
  truncated: bool
  special_text: bool = False  # its message text wrote chat markup (rendered as plain text)


def render_conversation(messages: Sequence[Mapping[str, Any]], tokenizer: Any, *, max_len: int,
                        overlong: str = "truncate") -> Conversation | None:
  """Rendered ids and per-position loss weights (None: dropped, too long under ``"drop"`` or nothing to learn)."""
  if overlong not in OVERLONG_POLICIES:
    raise ValueError(f"overlong: expected one of {OVERLONG_POLICIES}, found {overlong!r}")
  rendered = chat_template.render(messages, tokenizer)
  ids, mask = rendered.ids, rendered.assistant_mask
  truncated = len(ids) > max_len
  if truncated:
    if overlong == "drop":
      return None
    ids, mask = ids[:max_len], mask[:max_len]
  weights = np.zeros(len(ids), np.float32)
  weights[:-1] = mask[1:]
  if not weights.any():
    return None
  return Conversation(ids.astype(np.int32), weights, truncated, rendered.special_text > 0)


def empty_rows(num_rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  return {"inputs": np.full((num_rows, seq_len), pad_id, np.int32),
          "targets": np.zeros((num_rows, seq_len), np.int32),
          "segment_ids": np.zeros((num_rows, seq_len), np.int32),
          "positions": np.zeros((num_rows, seq_len), np.int32),
          "loss_weights": np.zeros((num_rows, seq_len), np.float32),
          "source_ids": np.full((num_rows, seq_len), -1, np.int32)}


def write_conversation(rows: dict[str, np.ndarray], row: int, start: int, conv: Conversation, segment_id: int,
                       source_id: int = 0) -> None:
  n = len(conv.ids)
  stop = start + n
  rows["inputs"][row, start:stop] = conv.ids
  rows["targets"][row, start:stop - 1] = conv.ids[1:]
  rows["loss_weights"][row, start:stop] = conv.weights
  rows["segment_ids"][row, start:stop] = segment_id
  rows["positions"][row, start:stop] = np.arange(n, dtype=np.int32)
  rows["source_ids"][row, start:stop] = source_id


def pack_conversations(conversations: Sequence[Conversation], seq_len: int, pad_id: int = 0
                       ) -> dict[str, np.ndarray]:
  """Next-fit packing of a finite list, in order (each conversation must fit in ``seq_len``)."""
  layout: list[list[Conversation]] = [[]]
  used = 0
  for conv in conversations:
    if len(conv.ids) > seq_len:
      raise ValueError(f"conversation of {len(conv.ids)} tokens does not fit seq_len {seq_len}")
    if used + len(conv.ids) > seq_len:
      layout.append([])
      used = 0
    layout[-1].append(conv)
    used += len(conv.ids)
  rows = empty_rows(len(layout), seq_len, pad_id)
  for r, convs in enumerate(layout):
    start = 0
    for s, conv in enumerate(convs, start=1):
      write_conversation(rows, r, start, conv, s)
      start += len(conv.ids)
  return rows


# ----------------------------------------------------------------------------------------------------------------
# Mixture iterator
# ----------------------------------------------------------------------------------------------------------------
class _RenderCache:
  """(source, split index) -> rendered Conversation (or None), bounded by a token budget (oldest evicted)."""

  def __init__(self, max_tokens: int):
    self.max_tokens, self.tokens = max_tokens, 0
    self._items: collections.OrderedDict[tuple[str, int, int], Conversation | None] = collections.OrderedDict()

  def get(self, key, make):
    if key in self._items:
      return self._items[key]
    value = make()
    self._items[key] = value
    self.tokens += len(value.ids) if value is not None else 1
    while self.tokens > self.max_tokens and len(self._items) > 1:
      _, old = self._items.popitem(last=False)
      self.tokens -= len(old.ids) if old is not None else 1
    return value


class SFTMixtureIterator(ShardedBatchIterator):
  """Packed, process-sharded global SFT batches from named chat sources under a per-call mixture."""

  def __init__(self, sources: Mapping[str, ChatSource], tokenizer: Any, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, split: str = "train", overlong: str = "truncate",
               max_cached_tokens: int = 20_000_000):
    super().__init__(sources, tokenizer, batch_size=batch_size, seed=seed, process_index=process_index,
                     process_count=process_count, split=split)
    if overlong not in OVERLONG_POLICIES:
      raise ValueError(f"overlong: expected one of {OVERLONG_POLICIES}, found {overlong!r}")
    self.sources = dict(sources)
    self.overlong = overlong
    self._streams = {}
    for i, (name, source) in enumerate(self.sources.items()):
      shuffle_seed = int(np.random.SeedSequence([_SEED_SALT, self.seed, i]).generate_state(1)[0])
      self._streams[name] = EpochShuffledIndices(source.split_indices(split), shuffle_seed, split == "train")
    self._cache = _RenderCache(max_cached_tokens)
    self._cursors = {name: 0 for name in self.source_names}
    self.stats = {"conversations": 0, "truncated": 0, "dropped": 0, "special_text": 0, "rows": 0, "tokens": 0,
                  "loss_tokens": 0}

  def _conversation(self, name: str, cursor: int, seq_len: int) -> Conversation | None:
    index = self._streams[name][cursor]
    source = self.sources[name]
    return self._cache.get((name, index, seq_len), lambda: render_conversation(
        source.conversation(index), self.tokenizer, max_len=seq_len, overlong=self.overlong))

  def _fill_row(self, rows: dict[str, np.ndarray] | None, row: int, name: str, seq_len: int) -> None:
    """Next-fit one row from ``name``'s stream (advances its cursor); ``rows=None`` only advances."""
    source_id = self.source_names.index(name)
    used, segment = 0, 0
    misses = 0
    while True:
      conv = self._conversation(name, self._cursors[name], seq_len)
      if conv is None:  # dropped (overlong under "drop", or nothing to learn)
        self._cursors[name] += 1
        misses += 1
        if rows is not None:
          self.stats["dropped"] += 1
        if misses > 10_000 and used == 0:
          raise ValueError(f"SFT source {name!r}: 10000 conversations in a row were dropped (overlong with "
                           f"overlong='drop' at seq_len {seq_len}, or no assistant tokens)")
        continue
      if used + len(conv.ids) > seq_len:
        break
      if rows is not None:
        segment += 1
        write_conversation(rows, row, used, conv, segment, source_id)
        self.stats["conversations"] += 1
        self.stats["truncated"] += int(conv.truncated)
        self.stats["special_text"] += int(conv.special_text)
      used += len(conv.ids)
      self._cursors[name] += 1
      if used == seq_len:
        break

  def next_batch(self, weights: Mapping[str, float], seq_len: int) -> dict[str, np.ndarray]:
    """This process's ``(batch_size, seq_len)`` slice of the next global batch under ``weights``."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
      raise ValueError(f"seq_len must be an int >= 2, found {seq_len!r}")
    probabilities = validate_weights(weights, self.source_names)
    row_sources = draw_row_sources(probabilities, self.global_batch_size, self.seed, self._batch_counter)
    rows = empty_rows(self.batch_size, seq_len, self.tokenizer.pad_id)
    first = self.process_index * self.batch_size
    for global_row, source_index in enumerate(row_sources.tolist()):
      local = global_row - first
      own = 0 <= local < self.batch_size
      self._fill_row(rows if own else None, local, self.source_names[source_index], seq_len)
    self._batch_counter += 1
    self.stats["rows"] += self.batch_size
    self.stats["tokens"] += int((rows["segment_ids"] > 0).sum())
    self.stats["loss_tokens"] += int(rows["loss_weights"].sum())
    return rows

  def get_state(self) -> dict[str, Any]:
    return self._state(STATE_FORMAT, cursors=dict(self._cursors))

  def set_state(self, state: Mapping[str, Any]) -> None:
    counter = self._checked_batch_counter(state, STATE_FORMAT)
    cursors = state.get("cursors")
    if not isinstance(cursors, Mapping) or sorted(cursors) != sorted(self.source_names) or not all(
        isinstance(v, int) and v >= 0 for v in cursors.values()):
      raise ValueError(f"SFTMixtureIterator state cursors must map {self.source_names} to ints >= 0, "
                       f"found {cursors!r}")
    self._cursors = {k: int(v) for k, v in cursors.items()}
    self._batch_counter = counter

  def eval_batches(self, seq_len: int, *, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One deterministic pass over every source's eval split, in order (rows packed per source, the last batch
    padded with empty rows); at most ``max_batches`` batches. Each process gets its own rows."""
    rows_all: list[tuple[str, list[Conversation]]] = []
    for name in self.source_names:
      current: list[Conversation] = []
      used = 0
      for index in np.flatnonzero(self.sources[name]._eval_mask()):  # a source may have no eval conversations
        conv = self._cache.get((name, int(index), seq_len), lambda i=int(index): render_conversation(
            self.sources[name].conversation(i), self.tokenizer, max_len=seq_len, overlong=self.overlong))
        if conv is None:
          continue
        if used + len(conv.ids) > seq_len:
          rows_all.append((name, current))
          current, used = [], 0
        current.append(conv)
        used += len(conv.ids)
      if current:
        rows_all.append((name, current))
    global_rows = self.global_batch_size
    num_batches = -(-len(rows_all) // global_rows)
    if max_batches:
      num_batches = min(num_batches, max_batches)
    for b in range(num_batches):
      rows = empty_rows(self.batch_size, seq_len, self.tokenizer.pad_id)
      for local in range(self.batch_size):
        g = b * global_rows + self.process_index * self.batch_size + local
        if g >= len(rows_all):
          break
        name, convs = rows_all[g]
        start = 0
        for s, conv in enumerate(convs, start=1):
          write_conversation(rows, local, start, conv, s, self.source_names.index(name))
          start += len(conv.ids)
      yield rows
