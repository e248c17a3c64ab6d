"""Per-array checksums that a checkpoint stores at save and verifies on restore (corruption is an error, not NaNs).

The checksum of an array is computed from the bits of its elements in the dtype it is stored in: each element is
viewed as unsigned words (bitcast; 1- and 2-byte dtypes widened to uint32, bool as 0/1), each word is combined with
its row-major linear index and a seed and put through the murmur3 32-bit finaliser, and the words' values are summed
modulo 2**32; two seeds give 64 bits, written as 16 hex digits after the dtype (``"bfloat16:0123456789abcdef"``).
A change of any byte changes the sum except with probability ~2**-64 (the index makes moved/swapped values count).

Why this construction: modular addition is associative and commutative, so the value does not depend on how the
array is laid out. A ``jax.Array`` is hashed by one jitted function on the global value: each device hashes its own
shard and XLA all-reduces the partial sums. A multi-process save therefore never gathers an array onto one host,
every process computes the same value (it must call ``tree_checksums`` collectively, as it calls save/restore), and
a checkpoint written on an 8-device mesh verifies after a restore onto 1 device or into host numpy. Host numpy
leaves are hashed on the default device (8-byte dtypes, which jax holds only with x64, by the same arithmetic in
numpy; ``tests/test_checkpoint_integrity.py`` checks the two implementations agree). On one CPU core the jitted
hash runs at ~0.5 GB/s, so pass the training shardings when verifying a large state.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

ALGORITHM = "murmur3-fmix32-sum-2x32-v1"
_SEEDS = (0x9E3779B9, 0x85EBCA77)
_WORD_DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _fmix32(xp, h):
  h = h ^ (h >> 16)
  h = h * xp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * xp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _sums(xp, words, linear):
  out = []
  for seed in _SEEDS:
    mixed = _fmix32(xp, words ^ _fmix32(xp, linear * xp.uint32(2) + xp.uint32(seed)))
    out.append(xp.sum(mixed, dtype=xp.uint32))
  return xp.stack(out)


def _jax_words(x: jax.Array) -> jax.Array:
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = np.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # trailing axis of 2 words
  return jax.lax.bitcast_convert_type(x, _WORD_DTYPES[size]).astype(jnp.uint32)


def _jax_leaf(x: jax.Array) -> jax.Array:
  words = _jax_words(x)
  linear = jnp.zeros(words.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    linear = linear + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= words.shape[axis]
  return _sums(jnp, words, linear)


def _numpy_leaf(x: np.ndarray) -> np.ndarray:
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    words = x.astype(np.uint32)
  elif x.dtype.itemsize == 8:
    words = x.view(np.uint32).reshape(x.shape + (2,))
  else:
    words = x.view(_WORD_DTYPES[x.dtype.itemsize]).reshape(x.shape).astype(np.uint32)
  linear = (np.arange(words.size, dtype=np.uint64) % 2**32).astype(np.uint32).reshape(words.shape)
  with np.errstate(over="ignore"):
    return _sums(np, words, linear)


def _replicated(leaf: jax.Array):
  sharding = leaf.sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return jax.sharding.SingleDeviceSharding(next(iter(sharding.device_set)))


@functools.lru_cache(maxsize=64)
def _jitted(out_shardings: tuple):
  """One compiled hash per (tree, placement): repeated saves of the same state reuse it."""
  return jax.jit(lambda tree: {k: _jax_leaf(v) for k, v in tree.items()}, out_shardings=dict(out_shardings))


def _format(dtype: Any, sums: np.ndarray) -> str:
  a, b = (int(v) for v in np.asarray(sums, dtype=np.uint32))
  return f"{np.dtype(dtype).name}:{a:08x}{b:08x}"


def stored_dtype(checksum: str) -> str:
  """The dtype name a checksum was computed in (``"int64:..."`` -> ``"int64"``)."""
  return checksum.split(":", 1)[0]


def tree_checksums(flat: dict[str, Any], as_dtypes: dict[str, str] | None = None) -> dict[str, str]:
  """``{key path: "dtype:hex"}`` for a flat ``{key path: leaf}`` dict (jax.Array, numpy or Python scalar leaves).
  ``as_dtypes``: hash a leaf whose dtype differs from the one given for its key in that dtype (a 64-bit scalar saved
  from numpy comes back 32-bit in a jax.Array when x64 is off; such a leaf is read to the host). Collective in a
  multi-process run (every process must call it with the same global arrays)."""
  as_dtypes = as_dtypes or {}
  flat = dict(flat)
  for key, value in flat.items():
    want = as_dtypes.get(key)
    dtype = value.dtype if isinstance(value, (jax.Array, np.ndarray, np.generic)) else np.asarray(value).dtype
    if want is not None and np.dtype(dtype).name != want:
      if not isinstance(value, jax.Array) or value.is_fully_addressable:
        flat[key] = np.asarray(value).astype(want)
  for key, value in flat.items():  # host arrays of <= 4-byte dtypes hash faster on the default device (jitted)
    if not isinstance(value, jax.Array) and np.asarray(value).dtype.itemsize <= 4:
      flat[key] = jax.device_put(np.asarray(value))
  device = {k: v for k, v in flat.items() if isinstance(v, jax.Array)}
  groups: dict[frozenset, dict[str, jax.Array]] = {}  # one jitted call per device set (a jit needs one)
  for key, value in device.items():
    groups.setdefault(frozenset(d.id for d in value.sharding.device_set), {})[key] = value
  out: dict[str, str] = {}
  for group in groups.values():
    sums = _jitted(tuple((k, _replicated(v)) for k, v in group.items()))(group)
    for key, value in sums.items():
      host = value.addressable_data(0) if not value.is_fully_addressable else value
      out[key] = _format(device[key].dtype, np.asarray(host))
  for key, value in flat.items():
    if key not in device:
      array = np.asarray(value)
      out[key] = _format(array.dtype, _numpy_leaf(array))
  return out


def mismatches(stored: dict[str, str], found: dict[str, str]) -> list[str]:
  """Key paths whose checksum differs (or that one side lacks), in stored order."""
  keys = list(stored) + [k for k in found if k not in stored]
  return [k for k in keys if stored.get(k) != found.get(k)]
