"""Grouped-query self-attention with rotary embeddings and three interchangeable kernels.

* ``xla``: einsum attention with an explicit (causal & same-segment) mask, fp32 scores and softmax. Always
  available, the CPU path, and the only path that reads a KV cache.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on NVIDIA GPUs).
* ``splash``: the Pallas TPU splash-attention kernel (causal mask + segment ids), wrapped in ``shard_map`` when a
  mesh is active.
* ``auto``: splash on TPU, cudnn on GPU, xla elsewhere.

The ``xla`` path materialises fp32 (T, T) scores for every head of every row: ``num_heads * T * T * 4`` bytes a row
(~86 GB for one 32K row of Nanbeige4-3B). ``check_attention_memory(cfg, batch, seq_len)`` refuses a configuration
whose resolved kernel is ``xla`` with more than ``ModelConfig.max_xla_attention_bytes`` of scores a row, naming
the numbers; a stage calls it before compiling, and the attention layer enforces it while tracing (the KV-cache
path of generation is exempt: it is the only path that reads a cache).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from nanbeige_jax.model.layers import dtype_of, make_param, project
from nanbeige_jax.model.rope import apply_rope
from nanbeige_jax.sharding import current_mesh_rules, logical_to_spec, target_platform, with_logical_constraint

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_index: jax.Array, kv_index: jax.Array, q_segment: jax.Array,
                   kv_segment: jax.Array) -> jax.Array:
  """Boolean (B, T, S): key s is visible to query t iff s <= t (by slot index) and both are in the same
  non-padding segment (segment id 0 marks padding/empty cache slots)."""
  causal = kv_index[None, None, :] <= q_index[:, :, None]
  same = (q_segment[:, :, None] == kv_segment[:, None, :]) & (kv_segment[:, None, :] != 0)
  return causal & same


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q (B,T,H,D); k,v (B,S,K,D); mask (B,T,S) -> (B,T,H,D). Query head h reads kv head h // (H/K)."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(d)))
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def cudnn_attention(q, k, v, segment_ids, implementation: str = "cudnn"):
  """``jax.nn.dot_product_attention`` (cuDNN flash attention on NVIDIA GPUs). ``implementation="xla"`` runs the
  same call through XLA anywhere (tests use it to check the masking on CPU)."""
  if implementation == "cudnn" and target_platform() != "gpu":
    raise ValueError(f"attention_impl='cudnn' needs an NVIDIA GPU, found platform "
                     f"{target_platform()!r}; use attention_impl='auto' or 'xla'")
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
  idx = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  mask = attention_mask(idx, jnp.arange(k.shape[1]), segment_ids, segment_ids)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def splash_attention(q, k, v, segment_ids, interpret: bool | None = None):
  """Pallas splash attention (TPU). q (B,T,H,D), k/v (B,S,K,D); causal within segments. Off TPU the kernel runs
  in Pallas interpret mode (slow, exact: what the CPU tests check against the XLA path)."""
  if interpret is None:
    interpret = target_platform() != "tpu"
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  def local(q, k, v, seg):
    b, t, h, d = q.shape
    kvh = k.shape[2]
    groups = h // kvh
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(groups)])
    block = min(512, t)
    sizes = sk.BlockSizes(block_q=block, block_kv_compute=block, block_kv=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    qg = (q * (1.0 / jnp.sqrt(jnp.float32(d))).astype(q.dtype)).reshape(b, t, kvh, groups, d)
    qg = qg.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, D)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, D)
    segs = sk.SegmentIds(q=seg, kv=seg)

    def one(qh, kh, vh, s):
      return kernel(qh, kh, vh, segment_ids=s)
    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))  # over kv heads
    out = jax.vmap(per_kv, in_axes=(0, 0, 0, 0))(qg, kk, vv, segs)  # (B, K, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)

  if segment_ids is None:
    segment_ids = jnp.ones(q.shape[:2], jnp.int32)
  ctx = current_mesh_rules()
  if ctx is None:
    return local(q, k, v, segment_ids)
  mesh, rules = ctx
  qspec = logical_to_spec(("batch", "length", "act_heads", None), rules, mesh, q.shape)
  kvspec = logical_to_spec(("batch", "length", "act_kv_heads", None), rules, mesh, k.shape)
  sspec = logical_to_spec(("batch", "length"), rules, mesh, segment_ids.shape)
  head = lambda spec: spec[2] if len(spec) > 2 else None  # noqa: E731
  if head(qspec) != head(kvspec):
    # Query head h reads kv head h // G: the two head axes must be split the same way (or not at all).
    unshard = lambda spec: PartitionSpec(*(tuple(spec[:2]) + (None,) * (2 - len(spec[:2]))))  # noqa: E731
    qspec, kvspec = unshard(qspec), unshard(kvspec)
  return jax.shard_map(local, mesh=mesh, in_specs=(qspec, kvspec, kvspec, sspec), out_specs=qspec,
                       check_vma=False)(q, k, v, segment_ids)


def resolve_impl(impl: str, platform: str | None = None) -> str:
  if impl != "auto":
    return impl
  return {"tpu": "splash", "gpu": "cudnn"}.get(platform or target_platform(), "xla")


def xla_score_bytes(num_heads: int, seq_len: int) -> int:
  """Bytes of the fp32 (T, T) attention scores the xla path materialises for one row (all heads)."""
  return int(num_heads) * int(seq_len) * int(seq_len) * 4


def _gb(n: int) -> str:
  return f"{n / 1e9:.3g} GB"


def check_attention_memory(cfg, batch: int, seq_len: int, platform: str | None = None) -> None:
  """ValueError when ``cfg`` would run the xla attention (``attention_impl`` resolved for ``platform``, default: the
  compile target) on rows of ``seq_len`` tokens with more than ``cfg.max_xla_attention_bytes`` of (T, T) scores a
  row; ``batch``: rows per forward call (a micro-batch), reported with the total."""
  limit = cfg.max_xla_attention_bytes
  impl = resolve_impl(cfg.attention_impl, platform)
  if limit is None or impl != "xla":
    return
  per_row = xla_score_bytes(cfg.num_heads, seq_len)
  if per_row <= limit:
    return
  resolved = ("" if cfg.attention_impl == impl
              else f" (resolved from {cfg.attention_impl!r} on {platform or target_platform()})")
  raise ValueError(f"ModelConfig.attention_impl={impl!r}{resolved} would materialise fp32 (T, T) attention scores of "
                   f"{_gb(per_row)} per row ({cfg.num_heads} heads x {seq_len}^2 x 4 bytes; {_gb(per_row * batch)} for "
                   f"a batch of {batch} rows) > ModelConfig.max_xla_attention_bytes={_gb(limit)}; use "
                   f"attention_impl='auto' (splash on TPU, cudnn on GPU), shorter rows, or raise the limit")


class Attention(nnx.Module):
  def __init__(self, cfg, rngs: nnx.Rngs, stack: int | None = None):
    pd, std = dtype_of(cfg.param_dtype), cfg.initializer_range
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.dtype = dtype_of(cfg.dtype)
    self.impl = cfg.attention_impl
    self.cfg = cfg
    self.q_proj = make_param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, std, stack)
    self.k_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, std, stack)
    self.v_proj = make_param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd, std, stack)
    self.o_proj = make_param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, std, stack)

  def __call__(self, x, cos, sin, segment_ids, cache=None):
    """x (B,T,D). ``segment_ids`` (B,T) or None (one document per row). ``cache``: None for training, or
    (k_cache, v_cache, kv_segment, index) with caches (B,S,K,D), kv_segment (B,S) already holding this call's
    segments, and ``index`` the first slot this call writes. Returns (out, (k_cache, v_cache) or None)."""
    dt = self.dtype
    q = project(x, self.q_proj[...].astype(dt))
    k = project(x, self.k_proj[...].astype(dt))
    v = project(x, self.v_proj[...].astype(dt))
    q = with_logical_constraint(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "head_dim"))
    k = with_logical_constraint(apply_rope(k, cos, sin), ("batch", "length", "act_kv_heads", "head_dim"))
    v = with_logical_constraint(v, ("batch", "length", "act_kv_heads", "head_dim"))
    q, k, v = checkpoint_name(q, "query_proj"), checkpoint_name(k, "key_proj"), checkpoint_name(v, "value_proj")
    b, t = x.shape[:2]
    new_cache = None
    if cache is not None:
      k_cache, v_cache, kv_segment, index = cache
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
      new_cache = (k_cache, v_cache)
      q_index = jnp.broadcast_to(index + jnp.arange(t), (b, t))
      q_segment = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
      mask = attention_mask(q_index, jnp.arange(k_cache.shape[1]), q_segment, kv_segment)
      out = xla_attention(q, k_cache.astype(dt), v_cache.astype(dt), mask)
    else:
      impl = resolve_impl(self.impl)
      if impl == "xla":
        check_attention_memory(self.cfg, b, t)
        seg = segment_ids if segment_ids is not None else jnp.ones((b, t), jnp.int32)
        idx = jnp.broadcast_to(jnp.arange(t), (b, t))
        out = xla_attention(q, k, v, attention_mask(idx, jnp.arange(t), seg, seg))
      elif impl == "cudnn":
        out = cudnn_attention(q, k, v, segment_ids)
      elif impl == "splash":
        out = splash_attention(q, k, v, segment_ids)
      else:
        raise ValueError(f"unknown attention_impl {impl!r}")
    out = checkpoint_name(with_logical_constraint(out, ("batch", "length", "act_heads", "head_dim")),
                          "attention_out")
    return project(out, self.o_proj[...].astype(dt), contract=2), new_cache
