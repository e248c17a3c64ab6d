"""The models behind the refinement roles: one small interface, two real backends.

``ChatModel.complete(conversations) -> list[str]`` answers a batch of chat conversations (lists of
``{"role", "content"}`` messages), one reply each.

* ``LocalChatModel``: a checkpoint of this project served by the generation engine (``generate.Sampler``): each
  conversation is rendered with the Nanbeige chat template plus the generation prompt, sampled until
  ``<|im_end|>`` (or ``max_new_tokens``), and decoded. Conversations are processed in fixed-size batches so the
  sampler compiles once per prompt-length bucket.
* ``OpenAIChatModel``: any OpenAI-compatible endpoint (``POST {base_url}/v1/chat/completions``) through ``urllib``:
  bearer auth, a per-request timeout, retries with exponential backoff on connection errors, timeouts, HTTP 429
  and 5xx; other HTTP errors and malformed responses fail at once. Failures raise ``ModelError``.

``build_chat_model(spec, ...)`` turns a spec string into a model: ``checkpoint:<dir>`` (a run directory or
checkpoint directory; the tokenizer is ``<run>/tokenizer.model``) or ``openai:<model name>``.
"""
from __future__ import annotations

import json
import pathlib
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

Conversation = Sequence[dict[str, str]]


class ModelError(RuntimeError):
  """A role model could not produce a reply (after retries, where they apply)."""


class ChatModel:
  name = "model"

  def complete(self, conversations: Sequence[Conversation]) -> list[str]:
    raise NotImplementedError

  def describe(self) -> str:
    return self.name


class OpenAIChatModel(ChatModel):
  """An OpenAI-compatible chat-completions endpoint."""

  def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 60.0,
               max_retries: int = 3, backoff_s: float = 1.0, temperature: float = 0.7, max_tokens: int = 2048):
    if not base_url.startswith(("http://", "https://")):
      raise ValueError(f"OpenAIChatModel.base_url: expected an http(s) URL, found {base_url!r}")
    if not model:
      raise ValueError("OpenAIChatModel.model: a model name is required")
    if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
      raise ValueError(f"OpenAIChatModel: need timeout_s > 0, max_retries >= 0, backoff_s >= 0; found "
                       f"{timeout_s}, {max_retries}, {backoff_s}")
    base = base_url.rstrip("/")
    self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
    self.model, self.api_key = model, api_key
    self.timeout_s, self.max_retries, self.backoff_s = float(timeout_s), int(max_retries), float(backoff_s)
    self.temperature, self.max_tokens = float(temperature), int(max_tokens)
    self.name = f"openai:{model}@{base}"

  def _request(self, messages: Conversation) -> str:
    body = json.dumps({"model": self.model, "messages": [dict(m) for m in messages],
                       "temperature": self.temperature, "max_tokens": self.max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    last_error = "no attempt"
    for attempt in range(self.max_retries + 1):
      if attempt:
        time.sleep(self.backoff_s * 2 ** (attempt - 1))
      request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
      try:
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          payload = response.read()
      except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        last_error = f"HTTP {e.code}: {detail}"
        if e.code == 429 or e.code >= 500:
          continue
        raise ModelError(f"{self.url}: {last_error}") from None
      except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        last_error = f"{type(reason).__name__}: {reason}"
        continue
      return self._parse(payload)
    raise ModelError(f"{self.url}: no reply after {self.max_retries + 1} attempts; last error: {last_error}")

  def _parse(self, payload: bytes) -> str:
    try:
      data = json.loads(payload)
      content = data["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise ModelError(f"{self.url}: malformed chat-completions response ({type(e).__name__}: {e}): "
                       f"{payload[:200]!r}") from None
    if not isinstance(content, str):
      raise ModelError(f"{self.url}: choices[0].message.content is {type(content).__name__}, expected a string")
    return content

  def complete(self, conversations: Sequence[Conversation]) -> list[str]:
    return [self._request(c) for c in conversations]


class LocalChatModel(ChatModel):
  """A checkpoint of this project behind the generation engine."""

  def __init__(self, checkpoint: str | pathlib.Path, *, tokenizer_path: str | pathlib.Path | None = None,
               step: int | None = None, max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
               batch_size: int = 8, seed: int = 0, prompt_bucket: int = 128):
    from nanbeige_jax.data.tokenizer import Tokenizer
    from nanbeige_jax.generate import Sampler, SamplingConfig, load_model, resolve_stop_tokens
    from nanbeige_jax import paths
    ckpt_dir, run_dir = paths.resolve_run_dirs(checkpoint, what="LocalChatModel: checkpoint")
    tok_path = paths.as_path(tokenizer_path) if tokenizer_path else run_dir / "tokenizer.model"
    if not paths.is_file(tok_path):
      raise ValueError(f"LocalChatModel: tokenizer {str(tok_path)!r} does not exist (pass tokenizer_path)")
    self.tokenizer = Tokenizer.load(tok_path)
    model, _, self.step = load_model(ckpt_dir, step=step, tokenizer=self.tokenizer, dtype="float32")
    stops = resolve_stop_tokens(("<|im_end|>", "</s>"), self.tokenizer.special_ids)
    self.stop_ids = set(stops)
    self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p if temperature > 0 else 1.0, stop_token_ids=stops)
    self.sampler = Sampler(model, pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size,
                           prompt_bucket=prompt_bucket)
    self.batch_size, self.seed = batch_size, seed
    self._calls = 0
    self.name = f"checkpoint:{ckpt_dir}@{self.step}"

  def _prompt(self, messages: Conversation) -> list[int]:
    from nanbeige_jax.data.chat_template import render_prompt
    prompt = render_prompt(messages, self.tokenizer)
    room = self.sampler.max_cache_length - self.sampling.max_new_tokens
    return prompt[-room:]  # keep the most recent context when a long critique overflows a small model's window

  def complete(self, conversations: Sequence[Conversation]) -> list[str]:
    prompts = [self._prompt(c) for c in conversations]
    out: list[str] = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = prompts[start:start + self.batch_size]
      fill = self.batch_size - len(chunk)
      self._calls += 1
      result = self.sampler.generate(chunk + [chunk[0]] * fill, self.sampling,
                                     seeds=self.seed * 1_000_003 + self._calls * self.batch_size)
      for tokens in result.tokens[:len(chunk)]:
        ids = [int(t) for t in tokens if int(t) not in self.stop_ids]
        out.append(self.tokenizer.decode(ids))
    return out


def build_chat_model(spec: str, *, base_url: str | None = None, api_key: str | None = None,
                     timeout_s: float = 60.0, max_retries: int = 3, temperature: float = 0.7,
                     max_tokens: int = 1024, seed: int = 0, **local_kwargs: Any) -> ChatModel:
  """``checkpoint:<dir>`` or ``openai:<model>`` (the latter needs ``base_url``)."""
  kind, _, target = spec.partition(":")
  if kind == "checkpoint" and target:
    return LocalChatModel(target, max_new_tokens=max_tokens, temperature=temperature, seed=seed, **local_kwargs)
  if kind == "openai" and target:
    if not base_url:
      raise ValueError(f"model spec {spec!r}: an OpenAI-compatible model needs --base_url")
    return OpenAIChatModel(base_url, target, api_key=api_key, timeout_s=timeout_s, max_retries=max_retries,
                           temperature=temperature, max_tokens=max_tokens)
  raise ValueError(f"model spec {spec!r}: expected 'checkpoint:<run or checkpoint dir>' or 'openai:<model name>'")
