"""The JSON metadata stored with every checkpoint, and the model config a checkpoint was trained as.

``build_metadata`` records the *operative* model: the ``model_config`` (and ``model_fingerprint``) carry the RoPE
base the parameters were trained at (an FG-WSD stable phase trains at another base than the preset's, see the
paper's ABF), also stored as ``rope_theta`` next to the schedule ``phase``. ``model_config_from_metadata`` is what
every loader (eval, sampler, SFT init, HF export) uses, so a checkpoint is always run at the base it was trained at.
Checkpoints written before ``rope_theta`` was recorded fall back to their ``model_config``'s value.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
from typing import Any

from nanbeige_jax.checkpoint_errors import CheckpointError

FORMAT_VERSION = 2  # 2: rope_theta/phase in the metadata, per-array checksums item
_VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")


def _package_versions() -> dict[str, str | None]:
  import nanbeige_jax
  versions: dict[str, str | None] = {}
  for name in _VERSIONED_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  versions["nanbeige_jax"] = nanbeige_jax.__version__
  return versions


def build_metadata(model_cfg, *, stage: str, tokenizer_fingerprint: str | None = None,
                   rope_theta: float | None = None, phase: str | None = None, extra: dict | None = None) -> dict:
  """The JSON metadata stored with every checkpoint (``model_cfg`` is a ``ModelConfig``). ``rope_theta``: the base
  the parameters were trained at when it is not ``model_cfg``'s (the schedule phase's); ``phase``: its name."""
  if not isinstance(stage, str) or not stage:
    raise ValueError(f"build_metadata: stage must be a non-empty string, found {stage!r}")
  if tokenizer_fingerprint is not None and not isinstance(tokenizer_fingerprint, str):
    raise ValueError(f"build_metadata: tokenizer_fingerprint must be a string or None, "
                     f"found {type(tokenizer_fingerprint).__name__}")
  if phase is not None and not isinstance(phase, str):
    raise ValueError(f"build_metadata: phase must be a string or None, found {phase!r}")
  if rope_theta is not None:
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 1:
      raise ValueError(f"build_metadata: rope_theta must be a number > 1 or None, found {rope_theta!r}")
    model_cfg = model_cfg.replace(rope_theta=float(rope_theta))
  metadata = {
      "format_version": FORMAT_VERSION,
      "model_config": model_cfg.to_dict(),
      "model_fingerprint": model_cfg.fingerprint(),
      "rope_theta": float(model_cfg.rope_theta),
      "phase": phase,
      "stage": stage,
      "tokenizer_fingerprint": tokenizer_fingerprint,
      "versions": _package_versions(),
      "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "extra": dict(extra or {}),
  }
  check_json("metadata", metadata)
  return metadata


def with_operative_rope(metadata: dict, *, rope_theta: float, phase: str | None) -> dict:
  """A copy of ``metadata`` (``build_metadata`` output) recording that the parameters were trained at ``rope_theta``
  in schedule phase ``phase``: ``model_config``, ``model_fingerprint``, ``rope_theta`` and ``phase`` updated."""
  from nanbeige_jax.model import ModelConfig
  if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or not rope_theta > 1:
    raise ValueError(f"with_operative_rope: rope_theta must be a number > 1, found {rope_theta!r}")
  cfg = ModelConfig.from_dict(metadata["model_config"]).replace(rope_theta=float(rope_theta))
  out = dict(metadata)
  out.update(model_config=cfg.to_dict(), model_fingerprint=cfg.fingerprint(), rope_theta=float(rope_theta),
             phase=phase)
  return out


def model_config_from_metadata(metadata: dict, where: str = "checkpoint"):
  """The ``ModelConfig`` a checkpoint was trained as, with the operative RoPE base (``metadata["rope_theta"]``
  when recorded, else the stored ``model_config``'s). Raises ``CheckpointError`` naming ``where`` when the
  metadata has no valid model_config."""
  from nanbeige_jax.model import ModelConfig
  stored = metadata.get("model_config")
  if not isinstance(stored, dict):
    raise CheckpointError(f"{where}: metadata has no model_config")
  try:
    cfg = ModelConfig.from_dict(stored)
    theta = metadata.get("rope_theta")
    return cfg if theta is None else cfg.replace(rope_theta=float(theta))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: metadata model_config is invalid: {e}") from None


def check_model_config(metadata: dict, model_cfg, *, rope_theta: float | None = None) -> None:
  """Raise CheckpointError unless the checkpoint's architecture, RoPE base included, matches ``model_cfg``
  (compile-time knobs such as scan_layers, remat_policy, dtype are free to differ); the message lists the differing
  fields. ``rope_theta``: the base the caller expects the checkpoint at (a resume into an FG-WSD phase passes that
  phase's base); None: ``model_cfg.rope_theta``."""
  expected = model_cfg if rope_theta is None else model_cfg.replace(rope_theta=float(rope_theta))
  stored = model_config_from_metadata(metadata)
  if stored.fingerprint() == expected.fingerprint():
    return
  stored_arch = stored.arch_dict()
  diffs = [f"{k}: checkpoint {stored_arch[k]!r} vs config {v!r}" for k, v in expected.arch_dict().items()
           if stored_arch[k] != v]
  raise CheckpointError(f"checkpoint model_fingerprint {stored.fingerprint()!r} does not match the config's "
                        f"{expected.fingerprint()!r}: " + "; ".join(diffs))


def tokenizer_mismatch(metadata: dict, tokenizer: Any) -> str | None:
  """None when ``tokenizer`` can be the one the checkpoint was trained with (same fingerprint, or none recorded);
  else the one-line reason (each caller raises its own error with its context)."""
  stored = metadata.get("tokenizer_fingerprint")
  if stored is None or stored == tokenizer.fingerprint():
    return None
  return (f"was trained with tokenizer fingerprint {stored}, but the configured tokenizer "
          f"{getattr(tokenizer, 'source', '')!r} has fingerprint {tokenizer.fingerprint()}")


def check_json(what: str, value: Any) -> None:
  """JSON items must be dicts with string keys that json can serialise (int keys would silently become str;
  tuples come back as lists)."""
  if not isinstance(value, dict):
    raise ValueError(f"{what} must be a dict, found {type(value).__name__}")

  def walk(node: Any, path: str) -> None:
    if isinstance(node, dict):
      for key, child in node.items():
        if not isinstance(key, str):
          raise ValueError(f"{what}: key {key!r} at {path or '<root>'} is {type(key).__name__}; JSON keys must be str")
        walk(child, f"{path}/{key}")
    elif isinstance(node, (list, tuple)):
      for i, child in enumerate(node):
        walk(child, f"{path}/{i}")
    elif not (node is None or isinstance(node, (str, bool, int, float))):
      raise ValueError(f"{what}: value at {path or '<root>'} has type {type(node).__name__}, which is not JSON "
                       f"(use str/int/float/bool/None/list/dict)")
  walk(value, "")
  json.dumps(value, allow_nan=True)
