"""The Nanbeige ChatML chat template, rendered straight to token ids with an assistant-token mask.

Format (one turn)::

    <|im_start|>{role}\\n{content}<|im_end|>\\n

An assistant turn with reasoning renders its content as ``<think>\\n{reasoning}\\n</think>\\n\\n{content}``; the
generation prompt is ``<|im_start|>assistant\\n``.

Special tokens are emitted as their ids (looked up in ``tokenizer.special_ids``), never found by the text encoder,
so user text that happens to contain ``<|im_end|>`` cannot forge a turn boundary: the text between special tokens
is encoded segment by segment with ``tokenizer.encode``.

The assistant mask is 1 on every token an assistant turn produces: its content, the ``<think>`` span when present,
and the closing ``<|im_end|>``; it is 0 on the role header ``<|im_start|>assistant\\n``, on the newline after
``<|im_end|>`` and on system/user turns. Every assistant turn of a multi-turn conversation is marked.
"""
from __future__ import annotations

import dataclasses
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

  def emit(tokens: Sequence[int], flag: int) -> None:
    ids.extend(int(t) for t in tokens)
    mask.extend([flag] * len(tokens))

  def text(s: str, flag: int) -> None:
    if s:
      emit(tokenizer.encode(s), flag)

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
  return RenderedChat(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def render_prompt(messages: Sequence[Mapping[str, Any]], tokenizer: TokenizerLike) -> list[int]:
  """Token ids of a conversation followed by the generation prompt (what the sampler is given)."""
  return render(messages, tokenizer, add_generation_prompt=True).ids.tolist()


def user_prompt(question: str, tokenizer: TokenizerLike, system: str | None = None) -> list[int]:
  """A single-turn prompt: optional system turn, the user's question, then the generation prompt."""
  messages = ([{"role": "system", "content": system}] if system is not None else [])
  messages.append({"role": "user", "content": question})
  return render_prompt(messages, tokenizer)
