"""Sampling settings and the per-step token choice (temperature, top-k, top-p, greedy).

Log-probability convention (what every sampler output and RL consumer in this project relies on):
the log-prob reported for a sampled token is ``log_softmax(logits / temperature)[token]``, i.e. its log-prob
under the *policy distribution at the sampling temperature*, **before** top-k/top-p truncation. Truncation only
restricts which tokens may be drawn; it is not part of the policy a trainer can re-evaluate with a teacher-forced
forward pass, so it is not folded into the reported log-probs. Greedy decoding (``temperature == 0``) reports
``log_softmax(logits)[token]`` (temperature 1). A teacher-forced pass that computes
``log_softmax(model(tokens) / temperature)`` reproduces these values exactly (up to float rounding).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from nanbeige_jax.config import strict_replace
from nanbeige_jax.losses import logprobs_from_logits

MAX_STOP_TOKENS = 16  # stop ids are a traced, fixed-size array: changing them does not recompile


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to decode. ``temperature == 0`` means greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable the
  truncations. ``stop_token_ids`` end a sample (the stop token is emitted and counted); ``max_new_tokens`` caps
  the number of generated tokens per sample."""

  max_new_tokens: int = 256
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  stop_token_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens: expected an int >= 1, found {self.max_new_tokens!r}")
    if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature: expected a finite float >= 0, found {self.temperature!r}")
    if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p: expected a float in (0, 1], found {self.top_p!r}")
    if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k: expected an int >= 0 (0 = off), found {self.top_k!r}")
    if not isinstance(self.stop_token_ids, tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
      raise ValueError(f"SamplingConfig.stop_token_ids: expected a tuple of ints, found {self.stop_token_ids!r}")
    if len(self.stop_token_ids) > MAX_STOP_TOKENS:
      raise ValueError(f"SamplingConfig.stop_token_ids: at most {MAX_STOP_TOKENS} stop tokens, found "
                       f"{len(self.stop_token_ids)}")
    if self.greedy and (self.top_k or self.top_p < 1):
      raise ValueError("SamplingConfig: temperature=0 is greedy decoding; top_k/top_p would be ignored, "
                       f"found top_k={self.top_k}, top_p={self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def truncates(self) -> bool:
    """Whether top-k/top-p apply (selects the compiled variant that sorts the logits every step)."""
    return self.top_k > 0 or self.top_p < 1

  def replace(self, **changes) -> "SamplingConfig":
    return strict_replace(self, **changes)

  def check_vocab(self, vocab_size: int) -> None:
    bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"SamplingConfig.stop_token_ids: {bad} are outside the model vocabulary [0, {vocab_size})")
    if self.top_k > vocab_size:
      raise ValueError(f"SamplingConfig.top_k={self.top_k} exceeds the vocabulary size {vocab_size}")


def truncate_logits(scaled: jax.Array, top_k: int | jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Set logits outside the top-k set and outside the top-p nucleus (of the top-k-renormalised distribution)
  to -inf. ``scaled`` (B, V) are temperature-scaled logits; ``top_k`` (0 = off) and ``top_p`` (1 = off) may be
  traced scalars, so changing them does not recompile. Ties at a threshold are kept; the most likely token is
  always kept. Nucleus rule (as in transformers): keep tokens in descending order while the mass before them is
  < top_p."""
  neg_inf = jnp.asarray(-jnp.inf, scaled.dtype)
  desc = -jnp.sort(-scaled, axis=-1)
  top_k = jnp.asarray(top_k, jnp.int32)
  kth = jnp.where(top_k > 0, jnp.take(desc, jnp.maximum(top_k, 1) - 1, axis=-1)[..., None], neg_inf)
  desc = jnp.where(desc >= kth, desc, neg_inf)
  probs = jax.nn.softmax(desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p) & (desc > neg_inf)
  keep = keep.at[..., 0].set(True)
  num_kept = jnp.sum(keep, axis=-1, keepdims=True)
  threshold = jnp.take_along_axis(desc, num_kept - 1, axis=-1)
  return jnp.where(scaled >= jnp.maximum(threshold, kth), scaled, neg_inf)


def choose_tokens(row_keys: jax.Array, logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array, greedy: jax.Array, *, truncate: bool, vocab_limit: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """One decoding step. ``row_keys`` (B,) typed PRNG keys (one stream per sample, so a sample does not depend on
  its batch-mates), ``logits`` (B, V) fp32; ``temperature``/``top_p``/``top_k``/``greedy`` are traced scalars
  (pass temperature 1 with greedy, see the module docstring); ``truncate`` (static) enables top-k/top-p;
  ``vocab_limit`` (static) forbids ids >= it (the padding rows of a model vocabulary larger than the tokenizer's):
  like truncation it restricts the draw, not the reported log-probs. Returns (tokens (B,) int32, log-probs (B,)
  fp32)."""
  scaled = logits.astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(scaled, axis=-1)
  drawable = scaled
  if vocab_limit is not None and vocab_limit < scaled.shape[-1]:
    drawable = jnp.where(jnp.arange(scaled.shape[-1]) < vocab_limit, scaled, -jnp.inf)
  masked = truncate_logits(drawable, top_k, top_p) if truncate else drawable
  sampled = jax.vmap(jax.random.categorical)(row_keys, masked)
  tokens = jnp.where(greedy, jnp.argmax(drawable, axis=-1), sampled).astype(jnp.int32)
  return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def policy_logprobs(logits: jax.Array, targets: jax.Array, temperature: float) -> jax.Array:
  """Teacher-forced counterpart of the sampler's log-probs: logits (..., V), targets (...) -> (...) fp32."""
  t = 1.0 if temperature == 0 else temperature
  return logprobs_from_logits(logits.astype(jnp.float32) / t, targets)


def resolve_stop_tokens(stop_tokens: Sequence[int | str], special_ids: dict[str, int] | None) -> tuple[int, ...]:
  """Stop tokens given as ids or special-token strings -> ids. An unknown string is an error."""
  out = []
  for tok in stop_tokens:
    if isinstance(tok, str):
      if not special_ids or tok not in special_ids:
        known = sorted(special_ids) if special_ids else []
        raise ValueError(f"unknown stop token {tok!r}: not a special token of the tokenizer (known: {known})")
      out.append(int(special_ids[tok]))
    elif isinstance(tok, int) and not isinstance(tok, bool):
      out.append(tok)
    else:
      raise ValueError(f"stop token {tok!r}: expected an int id or a special-token string")
  return tuple(dict.fromkeys(out))
