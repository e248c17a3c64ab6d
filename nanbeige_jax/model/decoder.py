"""The Nanbeige4 / Llama decoder in Flax NNX.

Parameters of the decoder layers are always stored *stacked* (a leading ``layers`` axis), whatever
``scan_layers`` says: the checkpoint layout never depends on a compile-time choice. ``scan_layers=True`` runs
the stack with ``jax.lax.scan`` (compile time flat in depth); ``False`` unrolls a Python loop over the slices.
Both wrap each layer in ``jax.checkpoint`` with the configured remat policy.

The forward pass is functional in its KV cache: a cache goes in and the updated cache comes out, so the
generation engine can donate it between steps.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from nanbeige_jax.model.attention import Attention
from nanbeige_jax.model.config import ModelConfig
from nanbeige_jax.model.layers import MLP, RMSNorm, dtype_of, make_param, project
from nanbeige_jax.model.rope import rope_cos_sin
from nanbeige_jax.sharding import with_logical_constraint

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention_out"),
    "save_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class KVCache(NamedTuple):
  """Static-size cache for all layers. k/v: (L, B, S, K, D); segment: (B, S) (0 = empty/padding slot);
  index: int32 scalar, the next slot to write."""
  k: jax.Array
  v: jax.Array
  segment: jax.Array
  index: jax.Array


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int | None = None):
    pd = dtype_of(cfg.param_dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs, stack)
    self.attn = Attention(cfg, rngs, stack)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs, stack)
    self.mlp = MLP(cfg, rngs, stack)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    h, new_cache = self.attn(self.input_norm(x), cos, sin, segment_ids, cache)
    x = x + h
    x = x + self.mlp(self.post_attn_norm(x))
    return with_logical_constraint(x, ("batch", "length", "act_embed")), new_cache


class Decoder(nnx.Module):
  """Token ids -> fp32 logits (or final hidden states, for vocabulary-chunked losses)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd, std = dtype_of(cfg.param_dtype), cfg.initializer_range
    self.embed = make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd, std)
    self.layers = DecoderLayer(cfg, rngs, stack=cfg.num_layers)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd, std)

  # --- pieces -------------------------------------------------------------------------------------------
  def head_weight(self) -> jax.Array:
    """(D, V) output projection in the compute dtype."""
    w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    return w.astype(dtype_of(self.cfg.dtype))

  def logits(self, hidden: jax.Array) -> jax.Array:
    out = project(hidden, self.head_weight(), preferred_element_type=jnp.float32)
    return with_logical_constraint(out, ("batch", "length", "act_vocab"))

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    cfg = self.cfg
    dt = dtype or dtype_of(cfg.dtype)
    shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_length), jnp.int32),
                   jnp.zeros((), jnp.int32))

  # --- forward ------------------------------------------------------------------------------------------
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               *, cache: KVCache | None = None, rope_theta: float | jax.Array | None = None,
               return_hidden: bool = False) -> Any:
    """tokens (B, T) int. positions default to 0..T-1 (or index..index+T-1 with a cache); segment_ids (B, T)
    separate packed documents (0 = padding). ``rope_theta`` overrides the config's base (ABF) without
    changing parameters. Returns logits (B, T, V) fp32, or hidden (B, T, D) with ``return_hidden``; with a
    cache, returns (out, new_cache)."""
    cfg = self.cfg
    dt = dtype_of(cfg.dtype)
    b, t = tokens.shape
    if positions is None:
      start = cache.index if cache is not None else 0
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    theta = cfg.rope_theta if rope_theta is None else rope_theta
    cos, sin = rope_cos_sin(positions, cfg.head_dim, theta)
    # Gather from the table with only its vocabulary axis sharded: FSDP gathers the embed axis for the lookup, as
    # for any weight. Gathering from an embed-sharded table leaves the rows' features split over the axis the batch
    # wants, a reshard the SPMD partitioner can only do by replicating the whole activation.
    table = with_logical_constraint(self.embed[...], ("vocab", None))
    x = jnp.take(table, tokens, axis=0).astype(dt)
    x = with_logical_constraint(x, ("batch", "length", "act_embed"))

    if cache is not None:
      seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
      kv_segment = jax.lax.dynamic_update_slice(cache.segment, seg.astype(jnp.int32), (0, cache.index))
    graphdef, state = nnx.split(self.layers)

    def body(x, xs):
      layer_state, layer_cache = xs
      layer = nnx.merge(graphdef, layer_state)
      c = None if layer_cache is None else (layer_cache[0], layer_cache[1], kv_segment, cache.index)
      return layer(x, cos, sin, segment_ids, c)

    if cfg.remat_policy != "none":
      body = jax.checkpoint(body, policy=_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    layer_caches = None if cache is None else (cache.k, cache.v)
    if cfg.scan_layers:
      x, new_kv = jax.lax.scan(body, x, (state, layer_caches))
    else:
      outs = []
      for i in range(cfg.num_layers):
        xs = jax.tree.map(lambda a: a[i], (state, layer_caches))
        x, c = body(x, xs)
        outs.append(c)
      new_kv = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)

    hidden = self.final_norm(x)
    out = hidden if return_hidden else self.logits(hidden)
    if cache is None:
      return out
    return out, KVCache(new_kv[0], new_kv[1], kv_segment, cache.index + t)


def abstract_model(cfg: ModelConfig) -> Decoder:
  """The model with ShapeDtypeStruct leaves: nothing allocated."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> int:
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(nnx.to_pure_dict(state)))


def decoder_from_params(cfg: ModelConfig, params: Any) -> Decoder:
  """A Decoder of ``cfg`` holding ``params`` (a pure nested dict of numpy or jax arrays, e.g. a checkpoint's or an
  HF import's), cast to ``cfg.param_dtype``, built without a random initialisation. ValueError naming the leaves
  when the tree or a shape does not match ``cfg``."""
  graphdef, state = nnx.split(abstract_model(cfg))
  param_state = nnx.state(nnx.merge(graphdef, state), nnx.Param)
  expected = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
              jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(param_state))}
  found = {jax.tree_util.keystr(k): tuple(jnp.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
  missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
  if missing or extra:
    raise ValueError(f"params do not match the model config: missing leaves {missing}, unexpected leaves {extra}")
  bad = [f"{k}: expected {expected[k]}, found {found[k]}" for k in expected if expected[k] != found[k]]
  if bad:
    raise ValueError(f"params do not match the model config: {'; '.join(bad[:4])}")
  dtype = jnp.dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(param_state, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
  return nnx.merge(graphdef, param_state)

