"""Chat sources for SFT: conversations with a train and an eval split (``jsonl`` files indexed by byte offset,
eval split by a content hash; the built-in ``arithmetic`` task as chats), and ``build_chat_source`` from a config
spec. See ``nanbeige_jax.data.sft_data`` for how they are rendered, packed and mixed."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nanbeige_jax.data import chat_template

ARITHMETIC_INSTRUCTION = "\nEnd with: The answer is N."


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
