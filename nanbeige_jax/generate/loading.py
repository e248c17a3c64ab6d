"""Load a model for generation from this project's checkpoints, checked against the tokenizer first.

Everything that can be checked from metadata is checked before any array is read or any program compiled: the
checkpoint's ``model_config`` must be a valid ``ModelConfig``, the tokenizer must fit the model's vocabulary, and a
checkpoint that records its tokenizer fingerprint must have been trained with exactly this tokenizer.
"""
from __future__ import annotations

import os
from typing import Any

from nanbeige_jax.checkpoint import CheckpointError, CheckpointManager, model_config_from_metadata, tokenizer_mismatch
from nanbeige_jax.model import Decoder, ModelConfig, decoder_from_params


def check_tokenizer_matches(model_cfg: ModelConfig, metadata: dict[str, Any], tokenizer: Any, where: str) -> None:
  """ValueError when ``tokenizer`` cannot be the one the checkpoint at ``where`` was trained with."""
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"{where}: tokenizer {getattr(tokenizer, 'source', '')!r} has {tokenizer.vocab_size} pieces "
                     f"but the checkpoint's model vocab_size is {model_cfg.vocab_size}")
  reason = tokenizer_mismatch(metadata, tokenizer)
  if reason:
    raise ValueError(f"{where}: checkpoint {reason} (vocabularies disagree)")


def load_model(checkpoint_dir: str | os.PathLike, *, step: int | None = None, tokenizer: Any = None,
               **config_overrides: Any) -> tuple[Decoder, dict[str, Any], int]:
  """(model, metadata, step) from a checkpoint directory (``step=None``: the latest). The model runs at the RoPE base
  the checkpoint was trained at (``checkpoint.model_config_from_metadata``). ``config_overrides`` change
  compile-time fields only (e.g. ``dtype="float32"``, ``scan_layers=False``)."""
  with CheckpointManager(checkpoint_dir, max_to_keep=None, async_save=False, create=False) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{checkpoint_dir}: no committed checkpoint step")
    metadata = manager.read_metadata(step)
    where = f"{checkpoint_dir} step {step}"
    try:
      stored_cfg = model_config_from_metadata(metadata, where)  # the RoPE base it was trained at
    except CheckpointError as e:
      raise ValueError(str(e)) from None
    arch = sorted(set(config_overrides) & set(ModelConfig.ARCH_FIELDS))
    if arch:
      raise ValueError(f"load_model: {arch} are architecture fields fixed by the checkpoint")
    cfg = stored_cfg.replace(**config_overrides) if config_overrides else stored_cfg
    if tokenizer is not None:
      check_tokenizer_matches(cfg, metadata, tokenizer, where)
    restored = manager.restore(step, params_only=True)
  return decoder_from_params(cfg, restored.params), metadata, step
