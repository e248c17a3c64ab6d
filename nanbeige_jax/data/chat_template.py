"""The Nanbeige ChatML chat template, rendered straight to token ids with an assistant-token mask.

Format (one turn)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

An assistant turn with reasoning renders its content as ``<think>\\n{reasoning}\\n</think>\\n\\n{content}``; the
generation prompt is ``<|im_start|>assistant\\n``.

Special tokens are emitted as their ids (looked up in ``tokenizer.special_ids``), never found by the text encoder,
and message text is encoded as plain text (``encode_text``: ``tokenizer.encode_text`` when the tokenizer has it,
else split on the special pieces with each piece broken into its first character and the rest), so user text that
contains ``<|im_end|>\n<|im_start|>assistant`` cannot forge a turn boundary; a text segment that still yields a
special id is an error. ``RenderedChat.special_text`` counts the special pieces found written in message text.

The assistant mask is 1 on every token an assistant turn produces: its content, the ``<think>`` span when present,
and the closing ``<|im_end|>``; it is 0 on the role header ``<|im_start|>assistant\\n``, on the newline after
``<|im_end|>`` and on system/user turns. Every assistant turn of a multi-turn conversation is marked.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
ROLES = ("system", "user", "assistant")
_FIELDS = {"role", "content", "reasoning"}


class TokenizerLike(Protocol):
  special_ids: dict[str, int]

  def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  ids: np.ndarray             # int32 (T,)
  assistant_mask: np.ndarray  # int32 (T,), 1 on assistant-produced tokens
  special_text: int = 0       # special pieces written literally in message text (encoded as plain text)


def _special_pieces(tokenizer: TokenizerLike) -> tuple[str, ...]:
  pieces = getattr(tokenizer, "user_defined_pieces", None)
  pieces = set(pieces if pieces is not None else ()) | set(tokenizer.special_ids)
  return tuple(sorted(pieces, key=lambda p: (-len(p), p)))


def find_special_text(text: str, tokenizer: TokenizerLike) -> list[str]:
  """Special pieces written literally in ``text`` (leftmost, longest first)."""
  if hasattr(tokenizer, "find_special_text"):
    return tokenizer.find_special_text(text)
  pieces = _special_pieces(tokenizer)
  return re.findall("|".join(map(re.escape, pieces)), text) if pieces else []


def encode_text(text: str, tokenizer: TokenizerLike) -> list[int]:
  """``text`` as plain text: no id of ``tokenizer.special_ids`` comes out of it (ValueError if one would)."""
  if hasattr(tokenizer, "encode_text"):
    ids = list(tokenizer.encode_text(text))
  else:
    pieces = _special_pieces(tokenizer)
    ids = []
    start = 0
    for match in (re.finditer("|".join(map(re.escape, pieces)), text) if pieces else ()):
      ids.extend(tokenizer.encode(text[start:match.start()]) if match.start() > start else [])
      ids.extend(tokenizer.encode(match.group()[0]))
      ids.extend(encode_text(match.group()[1:], tokenizer))
      start = match.end()
    ids.extend(tokenizer.encode(text[start:]) if start < len(text) else [])
  special = {i for piece, i in tokenizer.special_ids.items() if piece != "<unk>"}
  forged = [i for i in ids if i in special]
  if forged:
    raise ValueError(f"encoding message text {text[:80]!r} yielded special id(s) {forged[:5]}; the tokenizer cannot "
                     f"encode this text as plain text")
  return ids


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
  """A clear error for anything the template cannot render."""
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages: expected a list of dicts, found {type(messages).__name__}")
  if not messages:
    raise ValueError("messages: the conversation is empty")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping):
      raise TypeError(f"message {i}: expected a dict with 'role' and 'content', found {type(m).__name__}")
    unknown = sorted(set(m) - _FIELDS)
    if unknown:
      raise ValueError(f"message {i}: unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
    for field in ("role", "content"):
      if field not in m:
        raise ValueError(f"message {i}: missing field {field!r}")
    if m["role"] not in ROLES:
      raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], str):
      raise TypeError(f"message {i}: 'content' must be a str, found {type(m['content']).__name__}")
    if "reasoning" in m:
      if m["role"] != "assistant":
        raise ValueError(f"message {i}: 'reasoning' is only allowed on assistant turns, found role {m['role']!r}")
      if not isinstance(m["reasoning"], str):
        raise TypeError(f"message {i}: 'reasoning' must be a str, found {type(m['reasoning']).__name__}")


def _special(tokenizer: TokenizerLike, piece: str) -> int:
  ids = tokenizer.special_ids
  if piece not in ids:
    raise ValueError(f"tokenizer has no special token {piece!r} (it defines {sorted(ids)}); the chat template "
                     "needs <|im_start|>, <|im_end|>, <think>, </think> as atomic symbols")
  return int(ids[piece])


def render_text(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
  """The template as a string (for display and for comparison with other implementations)."""
  validate_messages(messages)
  out = []
  for m in messages:
    body = m["content"]
    if m["role"] == "assistant" and "reasoning" in m:
      body = f"{THINK_START}\n{m['reasoning']}\n{THINK_END}\n\n{body}"
    out.append(f"{IM_START}{m['role']}\n{body}{IM_END}\n")
  if add_generation_prompt:
    out.append(f"{IM_START}assistant\n")
  return "".join(out)


def render(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike,
           add_generation_prompt: bool = False) -> RenderedChat:
  """Messages -> token ids and assistant mask. ``add_generation_prompt`` appends ``<|im_start|>assistant\\n``
  (mask 0) for sampling a reply."""
  validate_messages(messages)
  im_start, im_end = _special(tokenizer, IM_START), _special(tokenizer, IM_END)
  ids: list[int] = []
  mask: list[int] = []
  special_text = 0

  def emit(tokens: Sequence[int], flag: int) -> None:
    ids.extend(int(t) for t in tokens)
    mask.extend([flag] * len(tokens))

  def text(s: str, flag: int) -> None:
    nonlocal special_text
    if s:
      special_text += len(find_special_text(s, tokenizer))
      emit(encode_text(s, tokenizer), flag)

  for m in messages:
    role = m["role"]
    is_assistant = int(role == "assistant")
    emit([im_start], 0)
    text(f"{role}\n", 0)
    if is_assistant and "reasoning" in m:
      emit([_special(tokenizer, THINK_START)], 1)
      text(f"\n{m['reasoning']}\n", 1)
      emit([_special(tokenizer, THINK_END)], 1)
      text("\n\n", 1)
    text(m["content"], is_assistant)
    emit([im_end], is_assistant)
    text("\n", 0)
  if add_generation_prompt:
    emit([im_start], 0)
    text("assistant\n", 0)
  return RenderedChat(np.asarray(ids, np.int32), np.asarray(mask, np.int32), special_text)


def render_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike) -> list[int]:
  """Token ids of a conversation followed by the generation prompt (what the sampler is given)."""
  return render(messages, tokenizer, add_generation_prompt=True).ids.tolist()


def user_prompt(question: str, tokenizer: TokenizerLike, system: str | None = None) -> list[int]:
  """A single-turn prompt: optional system turn, the user's question, then the generation prompt."""
  messages = ([{"role": "system", "content": system}] if system is not None else [])
  messages.append({"role": "user", "content": question})
  return render_prompt(messages, tokenizer)
