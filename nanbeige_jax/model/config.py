"""Model configuration: one typed, validated dataclass plus named presets.

The config is the single source of truth for the decoder's shape and numerics. It is serialised into every
checkpoint's metadata (``to_dict``/``from_dict``) and is strict: unknown keys and contradictory values raise a
one-line ``ValueError``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from nanbeige_jax.config import strict_replace

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_out", "save_out")
ATTENTION_IMPLS = ("xla", "cudnn", "splash", "auto")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-style (Nanbeige4) decoder."""

  vocab_size: int = 512
  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  intermediate_size: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 5e6
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  initializer_range: float = 0.02
  # Numerics: parameters are stored in ``param_dtype``; matmuls run in ``dtype``; logits/softmax are always fp32.
  param_dtype: str = "float32"
  dtype: str = "bfloat16"
  # Compile-time structure (these never change the parameter tree or the checkpoint layout).
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"
  # The xla attention kernel materialises fp32 (T, T) scores: refuse more than this many bytes of them a row
  # (``attention.check_attention_memory``); None: no limit. 8 GiB: Nanbeige4-3B (20 heads) up to ~10K tokens.
  max_xla_attention_bytes: int | None = 8 * 2**30

  def __post_init__(self):
    positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "max_position_embeddings")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"ModelConfig.{name}: expected a positive int, found {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"ModelConfig.num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for rotary embeddings")
    if not self.rms_norm_eps > 0:
      raise ValueError(f"ModelConfig.rms_norm_eps: expected > 0, found {self.rms_norm_eps!r}")
    if not self.rope_theta > 1:
      raise ValueError(f"ModelConfig.rope_theta: expected > 1, found {self.rope_theta!r}")
    for name in ("param_dtype", "dtype"):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f"ModelConfig.{name}: expected one of {DTYPES}, found {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy: expected one of {REMAT_POLICIES}, found {self.remat_policy!r}")
    limit = self.max_xla_attention_bytes
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
      raise ValueError(f"ModelConfig.max_xla_attention_bytes: expected a positive int or None, found {limit!r}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"ModelConfig.attention_impl: expected one of {ATTENTION_IMPLS}, "
                       f"found {self.attention_impl!r}")

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes: Any) -> "ModelConfig":
    return strict_replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    return cls().replace(**d)

  # Fields that define the parameter tree and the function it computes (the RoPE base included: parameters trained
  # at one base compute another function at another). Compile-time knobs are excluded so a checkpoint saved with
  # scan_layers=True restores into scan_layers=False, bf16 compute into fp32 compute, etc.
  ARCH_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings")

  def arch_dict(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in self.ARCH_FIELDS}

  def fingerprint(self) -> str:
    """Short hash of the architecture fields (what a checkpoint must agree with to be restored)."""
    blob = json.dumps(self.arch_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]

  def num_params(self) -> int:
    """Analytic parameter count (cross-checked against the abstract model in tests)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (MaxText convention): 6N for matmul params (embedding lookup excluded) plus
    causal attention, counted half: 6 * L * 2 * T * H * Dh / 2 (QK^T and PV, fwd+bwd)."""
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn_proj = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    matmul_params = self.num_layers * (attn_proj + 3 * d * f) + d * v
    attention = 6 * self.num_layers * 2 * seq_len * self.num_heads * self.head_dim / 2
    return 6 * matmul_params + attention


PRESETS: dict[str, ModelConfig] = {
    # Nanbeige4-3B (Base / Thinking-2510 / 2511): 3,933,637,120 parameters.
    "nanbeige4_3b": ModelConfig(
        vocab_size=166144, hidden_size=2560, num_layers=32, num_heads=20, num_kv_heads=4, head_dim=128,
        intermediate_size=10496, rms_norm_eps=1e-5, rope_theta=5e6, max_position_embeddings=32768,
        remat_policy="full"),
    # Nanbeige4.1-3B: same backbone, RoPE base raised again (ABF) for 256K positions.
    "nanbeige4_1_3b": ModelConfig(
        vocab_size=166144, hidden_size=2560, num_layers=32, num_heads=20, num_kv_heads=4, head_dim=128,
        intermediate_size=10496, rms_norm_eps=1e-5, rope_theta=7e7, max_position_embeddings=262144,
        remat_policy="full"),
    # ~70M-parameter model with the same proportions (head_dim 128, GQA 5:1) for single-host runs.
    "small": ModelConfig(
        vocab_size=32768, hidden_size=640, num_layers=8, num_heads=5, num_kv_heads=1, head_dim=128,
        intermediate_size=2624, rms_norm_eps=1e-5, rope_theta=5e6, max_position_embeddings=4096),
    # ~3M-parameter model: the CPU default for pretrain/SFT demos.
    "tiny": ModelConfig(
        vocab_size=2048, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
        intermediate_size=704, rms_norm_eps=1e-5, rope_theta=5e6, max_position_embeddings=1024,
        dtype="float32"),
    # A few thousand parameters: unit tests.
    "test": ModelConfig(
        vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=24,
        intermediate_size=96, rms_norm_eps=1e-5, rope_theta=5e6, max_position_embeddings=512,
        dtype="float32"),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
