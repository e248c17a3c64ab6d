"""Batched, jitted generation with a static-size, donated KV cache.

Flow for a batch of prompts (lists of token ids):

1. prompts are left-padded to a bucketed length ``P``; padding gets segment id 0 and the positions of real tokens
   start at 0 after the padding, so a prompt yields the same samples alone or in any batch;
2. ``prefill`` (jitted) runs the whole prompt through the model into a cache of ``P + max_new_tokens`` slots and
   draws the first token;
3. ``decode`` (jitted) runs a ``jax.lax.while_loop`` over the remaining tokens, one token per iteration, exiting
   early once every sample has emitted a stop token. The cache is donated from allocation to prefill to decode,
   so it is never copied.

Outputs are token ids (never re-tokenised text), the log-prob of every generated token (see
``nanbeige_jax.generate.sampling`` for the exact definition) and a finish reason per sample: ``"eos"`` (a stop
token was emitted; it is the last token returned) or ``"length"`` (``max_new_tokens`` reached).

Sharding: give a mesh and the parameters are placed with the training layout (logical-axis rules); the batch is
split over the ("data", "fsdp") axes and the cache follows the activation rules, so generation runs on the same
meshes as training.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from nanbeige_jax.generate.sampling import MAX_STOP_TOKENS, SamplingConfig, choose_tokens
from nanbeige_jax.model import Decoder, KVCache
from nanbeige_jax.sharding import (DEFAULT_RULES, Rules, logical_axes_tree, logical_to_spec, tree_shardings,
                                   use_mesh_rules)

FINISH_EOS = "eos"
FINISH_LENGTH = "length"
_CACHE_AXES = ("layers", "batch", "cache_length", "act_kv_heads", "head_dim")


@dataclasses.dataclass
class GenerationResult:
  """Per-sample outputs (lists, one entry per prompt, in prompt order) plus the padded arrays they come from."""
  tokens: list[np.ndarray]          # int32 (n_i,), generated ids, stop token included when finish == "eos"
  logprobs: list[np.ndarray]        # float32 (n_i,), log-prob of each generated token
  finish_reasons: list[str]         # "eos" | "length"
  token_array: np.ndarray           # int32 (B, max_new_tokens), pad_id after the end of each sample
  logprob_array: np.ndarray         # float32 (B, max_new_tokens), 0 after the end of each sample
  lengths: np.ndarray               # int32 (B,)


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Prompts -> (tokens, segment_ids, positions), each (B, length) int32, left-padded. Positions of real tokens
  count from 0 after the padding; padding has segment 0 and position 0."""
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  segments = np.zeros((b, length), np.int32)
  positions = np.zeros((b, length), np.int32)
  for i, p in enumerate(prompts):
    n = len(p)
    tokens[i, length - n:] = p
    segments[i, length - n:] = 1
    positions[i, length - n:] = np.arange(n)
  return tokens, segments, positions


class Sampler:
  """Generation engine for one model (its parameters are copied at construction; ``set_params`` swaps in new ones,
  e.g. the policy's after each RL update, without recompiling: the parameters are an argument of the jitted
  functions, never a constant).

  ``max_cache_length`` bounds prompt + generated tokens (default: the model's ``max_position_embeddings``);
  ``prompt_bucket`` rounds the padded prompt length up to limit recompilation; ``mesh``/``rules`` shard the
  computation like training does; ``rope_theta`` overrides the config's RoPE base (a checkpoint taken after a
  RoPE base change, ABF); ``vocab_limit`` (the tokenizer's size) keeps the padding ids of a larger model
  vocabulary from ever being sampled (they do not enter the reported log-probs' definition).
  """

  def __init__(self, model: Decoder, *, pad_id: int = 0, max_cache_length: int | None = None,
               prompt_bucket: int = 16, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
               rope_theta: float | None = None, vocab_limit: int | None = None):
    self.cfg = model.cfg
    if not 0 <= pad_id < self.cfg.vocab_size:
      raise ValueError(f"Sampler.pad_id={pad_id} is outside the model vocabulary [0, {self.cfg.vocab_size})")
    if prompt_bucket < 1:
      raise ValueError(f"Sampler.prompt_bucket: expected >= 1, found {prompt_bucket}")
    self.pad_id = pad_id
    self.max_cache_length = max_cache_length or self.cfg.max_position_embeddings
    self.prompt_bucket = prompt_bucket
    self.rope_theta = rope_theta
    if vocab_limit is not None and not 0 < vocab_limit <= self.cfg.vocab_size:
      raise ValueError(f"Sampler.vocab_limit={vocab_limit} must lie in (0, {self.cfg.vocab_size}]")
    self.vocab_limit = vocab_limit
    self.mesh, self.rules = mesh, tuple(rules)
    self.graphdef, self.state = nnx.split(model)
    self._param_shardings = None
    if mesh is not None:
      axes = logical_axes_tree(nnx.state(model, nnx.Param))
      self._param_shardings = tree_shardings(axes, mesh, self.rules)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    self._param_struct = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), params)
    self._copy = jax.jit(lambda tree: jax.tree.map(lambda x: x * jnp.ones((), x.dtype), tree),
                         out_shardings=self._param_shardings)
    self._compiled: dict[tuple, tuple] = {}
    self.set_params(params)

  def set_params(self, params) -> None:
    """Use ``params`` (a pure nested dict like ``TrainState.params``, same shapes and dtypes as the model's) from
    now on. They are copied (into the sampler's shardings when it has a mesh), so the caller may donate or delete
    its own arrays afterwards (the train step donates its state). Nothing is recompiled."""
    struct = jax.tree.map(lambda x: (tuple(np.shape(x)), jnp.dtype(x.dtype)), params)
    if jax.tree.structure(struct) != jax.tree.structure(self._param_struct) or struct != self._param_struct:
      diffs = [f"{jax.tree_util.keystr(k)}: {a} vs {b}" for (k, a), b in
               zip(jax.tree_util.tree_leaves_with_path(struct), jax.tree.leaves(self._param_struct))
               if a != b] if jax.tree.structure(struct) == jax.tree.structure(self._param_struct) else [
               "a different parameter tree"]
      raise ValueError(f"Sampler.set_params: parameters do not match the sampler's model ({'; '.join(diffs[:3])})")
    state = jax.tree.map(lambda x: x, self.state)
    nnx.replace_by_pure_dict(state, self._copy(params))
    self.state = state

  # --- sharding helpers --------------------------------------------------------------------------------------
  def _batch_multiple(self) -> int:
    if self.mesh is None:
      return 1
    spec = logical_to_spec(("batch",), self.rules, self.mesh)
    axes = spec[0] if len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

  def _sharding(self, axes):
    return None if self.mesh is None else NamedSharding(self.mesh, logical_to_spec(axes, self.rules, self.mesh))

  def _put(self, x, axes):
    return jnp.asarray(x) if self.mesh is None else jax.device_put(x, self._sharding(axes))

  # --- jitted pieces -----------------------------------------------------------------------------------------
  def _functions(self, batch: int, cache_len: int, sampling: SamplingConfig):
    key = (batch, cache_len, sampling.max_new_tokens, sampling.truncates)
    if key in self._compiled:
      return self._compiled[key]
    graphdef, theta = self.graphdef, self.rope_theta
    choose = functools.partial(choose_tokens, truncate=sampling.truncates, vocab_limit=self.vocab_limit)
    max_new = sampling.max_new_tokens
    cache_sharding = self._sharding(_CACHE_AXES)
    seg_sharding = self._sharding(("batch", "cache_length"))

    def constrain(cache: KVCache) -> KVCache:
      if cache_sharding is None:
        return cache
      return KVCache(jax.lax.with_sharding_constraint(cache.k, cache_sharding),
                     jax.lax.with_sharding_constraint(cache.v, cache_sharding),
                     jax.lax.with_sharding_constraint(cache.segment, seg_sharding), cache.index)

    def step_keys(row_keys, step):
      return jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)

    def init_cache(state):
      return constrain(nnx.merge(graphdef, state).init_cache(batch, cache_len))

    def prefill(state, cache, tokens, segment_ids, positions, row_keys, knobs):
      model = nnx.merge(graphdef, state)
      hidden, cache = model(tokens, positions, segment_ids, cache=cache, return_hidden=True, rope_theta=theta)
      logits = model.logits(hidden[:, -1:])[:, 0]
      tok, logp = choose(step_keys(row_keys, 0), logits, *knobs)
      return tok, logp, constrain(cache)

    def decode(state, cache, first_tok, first_logp, next_pos, row_keys, knobs, stop_ids):
      model = nnx.merge(graphdef, state)

      def is_stop(tok):  # stop_ids: (MAX_STOP_TOKENS,) padded with -1
        return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

      b = first_tok.shape[0]
      out_tok = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(first_tok)
      out_logp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(first_logp)
      ones = jnp.ones((b, 1), jnp.int32)

      def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

      def body(carry):
        step, cache, prev, done, out_tok, out_logp = carry
        pos = (next_pos + step - 1)[:, None]
        logits, cache = model(prev[:, None], pos, ones, cache=cache, rope_theta=theta)
        tok, logp = choose(step_keys(row_keys, step), logits[:, 0], *knobs)
        tok = jnp.where(done, self.pad_id, tok)
        logp = jnp.where(done, 0.0, logp)
        out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, step))
        out_logp = jax.lax.dynamic_update_slice(out_logp, logp[:, None], (0, step))
        return step + 1, constrain(cache), tok, done | is_stop(tok), out_tok, out_logp

      carry = (jnp.int32(1), cache, first_tok, is_stop(first_tok), out_tok, out_logp)
      _, cache, _, done, out_tok, out_logp = jax.lax.while_loop(cond, body, carry)
      return out_tok, out_logp, done, cache

    fns = (jax.jit(init_cache), jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, donate_argnums=(1,)))
    self._compiled[key] = fns
    return fns

  # --- public API --------------------------------------------------------------------------------------------
  def check_prompts(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> int:
    """Validate before anything compiles; returns the longest prompt length."""
    if not isinstance(sampling, SamplingConfig):
      raise TypeError(f"sampling: expected a SamplingConfig, found {type(sampling).__name__}")
    sampling.check_vocab(self.vocab_limit or self.cfg.vocab_size)
    if len(prompts) == 0:
      raise ValueError("generate: no prompts given")
    longest = 0
    for i, p in enumerate(prompts):
      if isinstance(p, (str, bytes)):
        raise TypeError(f"prompt {i}: expected a sequence of token ids, found {type(p).__name__} "
                        "(tokenize first, e.g. with nanbeige_jax.data.chat_template.render_prompt)")
      arr = np.asarray(p)
      if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"prompt {i}: expected a non-empty 1-D sequence of token ids, found shape {arr.shape}")
      if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompt {i}: expected integer token ids, found dtype {arr.dtype}")
      if arr.min() < 0 or arr.max() >= self.cfg.vocab_size:
        raise ValueError(f"prompt {i}: token ids must lie in [0, {self.cfg.vocab_size}), found "
                         f"min {arr.min()} max {arr.max()}")
      longest = max(longest, arr.size)
    if longest + sampling.max_new_tokens > self.max_cache_length:
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={sampling.max_new_tokens} exceeds the "
                       f"cache length {self.max_cache_length}")
    return longest

  def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
               seeds: Sequence[int] | int = 0, prompt_length: int | None = None) -> GenerationResult:
    """Sample one continuation per prompt. ``seeds``: one int per prompt (each sample's random stream depends
    only on its own seed; taken modulo 2**32), or one int ``s`` meaning seeds ``s, s+1, ...`` by prompt index.
    ``prompt_length`` fixes the padded prompt length (>= the longest prompt) so calls over different prompt sets
    share one compiled program."""
    longest = self.check_prompts(prompts, sampling)
    n = len(prompts)
    if isinstance(seeds, int):
      seeds = [seeds + i for i in range(n)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n:
      raise ValueError(f"generate: {len(seeds)} seeds for {n} prompts")
    max_new = sampling.max_new_tokens
    if prompt_length is not None:
      if not longest <= prompt_length <= self.max_cache_length - max_new:
        raise ValueError(f"generate: prompt_length={prompt_length} must lie in [{longest} (the longest prompt), "
                         f"{self.max_cache_length - max_new} (cache length - max_new_tokens)]")
      plen = prompt_length
    else:
      plen = min(_round_up(longest, self.prompt_bucket), self.max_cache_length - max_new)
    batch = _round_up(n, self._batch_multiple())
    filled = list(prompts) + [prompts[0]] * (batch - n)
    seeds = seeds + [seeds[0]] * (batch - n)
    tokens, segments, positions = left_pad([list(map(int, p)) for p in filled], plen, self.pad_id)
    next_pos = np.array([len(p) for p in filled], np.int32)
    row_keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray([s % 2**32 for s in seeds], np.uint32)))
    init_cache, prefill, decode = self._functions(batch, plen + max_new, sampling)
    knobs = (jnp.float32(1.0 if sampling.greedy else sampling.temperature), jnp.float32(sampling.top_p),
             jnp.int32(sampling.top_k), jnp.bool_(sampling.greedy))
    stop_ids = np.full((MAX_STOP_TOKENS,), -1, np.int32)
    stop_ids[:len(sampling.stop_token_ids)] = sampling.stop_token_ids
    ctx = use_mesh_rules(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
    with ctx:
      bt = ("batch", "length")
      cache = init_cache(self.state)
      first_tok, first_logp, cache = prefill(self.state, cache, self._put(tokens, bt), self._put(segments, bt),
                                             self._put(positions, bt), row_keys, knobs)
      out_tok, out_logp, done, _ = decode(self.state, cache, first_tok, first_logp,
                                          self._put(next_pos, ("batch",)), row_keys, knobs, jnp.asarray(stop_ids))
    out_tok, out_logp, done = (np.asarray(jax.device_get(x))[:n] for x in (out_tok, out_logp, done))
    lengths = np.full((n,), max_new, np.int32)
    reasons = []
    stop = np.asarray(sampling.stop_token_ids, np.int32)
    for i in range(n):
      if done[i]:
        lengths[i] = int(np.flatnonzero(np.isin(out_tok[i], stop))[0]) + 1
        reasons.append(FINISH_EOS)
      else:
        reasons.append(FINISH_LENGTH)
    return GenerationResult(
        tokens=[out_tok[i, :lengths[i]].copy() for i in range(n)],
        logprobs=[out_logp[i, :lengths[i]].copy() for i in range(n)],
        finish_reasons=reasons, token_array=out_tok, logprob_array=out_logp, lengths=lengths)

