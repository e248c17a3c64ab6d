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
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nanbeige_jax.data import chat_template
from nanbeige_jax.data.mixture import EpochShuffledIndices, ShardedBatchIterator, draw_row_sources, validate_weights

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights", "source_ids")
OVERLONG_POLICIES = ("truncate", "drop")
ARITHMETIC_INSTRUCTION = "\nEnd with: The answer is N."
STATE_FORMAT = "nanbeige_jax.data.SFTMixtureIterator/v1"
_SEED_SALT = 0x73667464  # "sftd"


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------
class ChatSource:
  """Conversations by index, with a train/eval split. Subclasses implement ``num_conversations``,
  ``conversation`` and ``_eval_mask``."""

  kind = "abstract"

  def __init__(self, name: str):
    if not isinstance(name, str) or not name:
      raise ValueError(f"chat source name must be a non-empty string, found {name!r}")
    self.name = name

  def num_conversations(self) -> int:
    raise NotImplementedError

  def conversation(self, index: int) -> list[dict[str, Any]]:
    raise NotImplementedError

  def _eval_mask(self) -> np.ndarray:
    raise NotImplementedError

  def split_indices(self, split: str) -> np.ndarray:
    if split not in ("train", "eval"):
      raise ValueError(f"split must be 'train' or 'eval', found {split!r}")
    mask = self._eval_mask()
    indices = np.flatnonzero(mask if split == "eval" else ~mask)
    if len(indices) == 0:
      raise ValueError(f"chat source {self.name!r} ({self.describe()}) has no {split} conversations")
    return indices

  def describe(self) -> str:
    return self.kind


_EVAL_SPLIT_SALT = b"nanbeige_jax.sft.eval_split:"


def content_fraction(record: bytes) -> float:
  """A record's position in [0, 1) for the train/eval split: a hash of its bytes (surrounding whitespace ignored)."""
  digest = hashlib.sha256(_EVAL_SPLIT_SALT + record.strip()).digest()
  return int.from_bytes(digest[:8], "little") / 2**64


class JsonlChatSource(ChatSource):
  """JSONL files of ``{"messages": [...], ...}`` records (see the module docstring)."""

  kind = "jsonl"

  def __init__(self, name: str, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               messages_field: str = "messages", eval_fraction: float = 0.01):
    super().__init__(name)
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    if not paths:
      raise ValueError(f"chat source {name!r}: no paths given")
    self.paths = [pathlib.Path(p) for p in paths]
    for path in self.paths:
      if not path.is_file():
        raise ValueError(f"chat source {name!r}: data file {str(path)!r} does not exist (bring your own chat JSONL "
                         f"and set its path in the gin config)")
    if not 0 <= eval_fraction < 1:
      raise ValueError(f"chat source {name!r}: eval_fraction must lie in [0, 1), found {eval_fraction!r}")
    self.messages_field = messages_field
    self.eval_fraction = float(eval_fraction)
    self._index: list[tuple[int, int, int]] | None = None  # (file number, byte offset, line number)
    self._fractions: list[float] | None = None  # content_fraction of each record

  def describe(self) -> str:
    return f"jsonl {', '.join(map(str, self.paths))}"

  def _lines(self) -> list[tuple[int, int, int]]:
    if self._index is None:
      index, fractions = [], []
      for file_number, path in enumerate(self.paths):
        with open(path, "rb") as f:
          offset = 0
          for line_number, line in enumerate(f, start=1):
            if line.strip():
              index.append((file_number, offset, line_number))
              fractions.append(content_fraction(line))
            offset += len(line)
      if not index:
        raise ValueError(f"chat source {self.name!r}: {self.describe()} holds no records")
      self._index, self._fractions = index, fractions
    return self._index

  def num_conversations(self) -> int:
    return len(self._lines())

  def conversation(self, index: int) -> list[dict[str, Any]]:
    file_number, offset, line_number = self._lines()[index]
    path = self.paths[file_number]
    with open(path, "rb") as f:
      f.seek(offset)
      raw = f.readline()
    return parse_chat_record(raw, f"{path}:{line_number}", self.messages_field)

  def validate(self, max_records: int | None = 1000) -> None:
    """Parse (up to ``max_records``) records now, so a bad file fails before training starts."""
    n = self.num_conversations()
    for i in range(n if max_records is None else min(n, max_records)):
      self.conversation(i)

  def _eval_mask(self) -> np.ndarray:
    self._lines()
    return np.array(self._fractions, np.float64) < self.eval_fraction


def parse_chat_record(raw: bytes | str, where: str, messages_field: str = "messages") -> list[dict[str, Any]]:
  """One JSONL line -> validated messages; errors name ``where`` (``path:line``)."""
  try:
    record = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{where}: not valid JSON ({e})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object with a {messages_field!r} list, found "
                     f"{type(record).__name__}")
  if messages_field not in record:
    raise ValueError(f"{where}: missing field {messages_field!r} (found fields {sorted(record)})")
  messages = record[messages_field]
  try:
    chat_template.validate_messages(messages)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{where}: {e}") from None
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: the conversation has no assistant turn (nothing to learn)")
  return [dict(m) for m in messages]


def arithmetic_messages(problem: Any, *, reasoning: bool = True) -> list[dict[str, str]]:
  """An arithmetic ``Problem`` as a chat: the worked steps as reasoning, the answer line as content."""
  from nanbeige_jax.data.tasks.arithmetic import ANSWER_PREFIX
  lines = problem.solution.split("\n")
  final = lines[-1]
  if not final.startswith(ANSWER_PREFIX):
    raise ValueError(f"arithmetic problem {problem.id}: solution does not end with {ANSWER_PREFIX!r}")
  steps = "\n".join(lines[:-1])
  assistant = ({"role": "assistant", "reasoning": steps, "content": final} if reasoning
               else {"role": "assistant", "content": problem.solution})
  return [{"role": "user", "content": problem.question + ARITHMETIC_INSTRUCTION}, assistant]


class ArithmeticChatSource(ChatSource):
  """The built-in arithmetic task as SFT chats (train split; eval = held-out split)."""

  kind = "arithmetic"

  def __init__(self, name: str = "arithmetic", *, num_train: int = 20_000, num_eval: int = 200, seed: int = 0,
               difficulties: Sequence[int] = (1, 2, 3), reasoning: bool = True):
    super().__init__(name)
    from nanbeige_jax.data.tasks import arithmetic
    self.num_train, self.num_eval = int(num_train), int(num_eval)
    self.seed, self.difficulties, self.reasoning = int(seed), tuple(difficulties), bool(reasoning)
    self._train = arithmetic.generate("train", self.num_train, seed=self.seed, difficulties=self.difficulties)
    self._eval = arithmetic.generate("heldout", self.num_eval, seed=self.seed, difficulties=self.difficulties)

  def describe(self) -> str:
    return (f"arithmetic (train {self.num_train}, eval {self.num_eval}, seed {self.seed}, "
            f"difficulties {list(self.difficulties)})")

  def num_conversations(self) -> int:
    return self.num_train + self.num_eval

  def conversation(self, index: int) -> list[dict[str, Any]]:
    problem = self._train[index] if index < self.num_train else self._eval[index - self.num_train]
    return arithmetic_messages(problem, reasoning=self.reasoning)

  def _eval_mask(self) -> np.ndarray:
    return np.arange(self.num_conversations()) >= self.num_train


CHAT_SOURCE_KINDS = {"jsonl": JsonlChatSource, "arithmetic": ArithmeticChatSource}


def build_chat_source(name: str, spec: Mapping[str, Any]) -> ChatSource:
  """``spec`` = ``{"kind": "jsonl", "paths": [...], ...}`` or ``{"kind": "arithmetic", ...}``."""
  if not isinstance(spec, Mapping) or "kind" not in spec:
    raise ValueError(f"SFT source {name!r}: expected a dict with a 'kind' key, found {spec!r}")
  kind = spec["kind"]
  if kind not in CHAT_SOURCE_KINDS:
    raise ValueError(f"SFT source {name!r}: unknown kind {kind!r}; known: {sorted(CHAT_SOURCE_KINDS)}")
  kwargs = {k: v for k, v in spec.items() if k != "kind"}
  if kind == "jsonl" and not kwargs.get("paths"):
    raise ValueError(f"SFT source {name!r}: kind 'jsonl' needs 'paths' (your chat JSONL files); set them in gin (the "
                     f"stage configs expose them as macros, e.g. COLD_START_MATH), or directly: SFTConfig.sources = {{'{name}': {{'kind': 'jsonl', 'paths': ['/data/{name}.jsonl']}}}}")
  try:
    source = CHAT_SOURCE_KINDS[kind](name, **kwargs)
  except TypeError as e:
    raise ValueError(f"SFT source {name!r}: bad arguments for kind {kind!r}: {e}") from None
  if isinstance(source, JsonlChatSource):
    source.validate()
  return source


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
    return {"format": STATE_FORMAT, "seed": self.seed, "split": self.split, "source_names": list(self.source_names),
            "tokenizer": self.tokenizer.fingerprint(), "batch_counter": self._batch_counter,
            "cursors": dict(self._cursors)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
      found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
      raise ValueError(f"not an SFTMixtureIterator state (expected format {STATE_FORMAT!r}, found {found!r})")
    expected = {"seed": self.seed, "split": self.split, "source_names": self.source_names,
                "tokenizer": self.tokenizer.fingerprint()}
    for key, value in expected.items():
      if state.get(key) != value:
        raise ValueError(f"SFTMixtureIterator state has {key}={state.get(key)!r} but this iterator has {value!r}")
    cursors = state.get("cursors")
    if not isinstance(cursors, Mapping) or sorted(cursors) != sorted(self.source_names) or not all(
        isinstance(v, int) and v >= 0 for v in cursors.values()):
      raise ValueError(f"SFTMixtureIterator state cursors must map {self.source_names} to ints >= 0, "
                       f"found {cursors!r}")
    counter = state.get("batch_counter")
    if not isinstance(counter, int) or counter < 0:
      raise ValueError(f"SFTMixtureIterator state batch_counter must be an int >= 0, found {counter!r}")
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
