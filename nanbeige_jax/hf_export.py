"""Checkpoint <-> Hugging Face directory conversion as the released model ships it (what ``launch/convert_hf.py`` runs).

* ``import_hf_dir``: an HF Llama directory -> a params-only checkpoint whose metadata records the source's stored
  dtype (``extra.hf_dtype``) and its config (``extra.hf_config``, with the bos/eos/pad ids).
* ``export_checkpoint``: a checkpoint step -> an HF directory with ``config.json`` at the RoPE base the parameters
  were trained at (``checkpoint.model_config_from_metadata``), the bos/eos/pad token ids, and a
  ``generation_config.json`` with the released Nanbeige4 sampling defaults (``do_sample``, temperature 0.6,
  top-p 0.95, the eos ids). The default dtype is the one recorded at import (so HF -> native -> HF is lossless),
  else the parameters' own dtype.

Token ids come from, in order: the given tokenizer; the ids recorded at import; ``<checkpoint dir>/../tokenizer.model``
(a training run's workdir layout). Chat checkpoints stop on ``<|im_end|>`` as well as ``</s>``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from nanbeige_jax import hf
from nanbeige_jax.hf import (CONFIG_FILE, HF_DTYPES, INDEX_FILE, SINGLE_WEIGHTS_FILE, TensorSpec, _get_path,
                             hf_config_from_model, np_dtype, tensor_specs, validate_native_params)
from nanbeige_jax.model.config import ModelConfig

GENERATION_CONFIG_FILE = "generation_config.json"
# The released Nanbeige4 models' sampling defaults (their generation_config.json).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def hf_stored_dtype(hf_dir: str | os.PathLike) -> str:
  """The dtype an HF directory stores its weights in (from the safetensors headers; the most common one)."""
  stored = hf._stored_tensors(Path(hf_dir), hf._weight_files(Path(hf_dir)))
  codes = [t.dtype for t in stored.values()]
  code = max(set(codes), key=codes.count)
  return _SAFETENSORS_DTYPES.get(code, code.lower())


def token_ids_from_tokenizer(tokenizer: Any) -> dict[str, Any]:
  """bos/eos/pad ids of a ``nanbeige_jax.data.tokenizer.Tokenizer``; eos is a list with ``<|im_end|>`` when the
  vocabulary has it (a chat model ends its turn with it)."""
  eos = [int(tokenizer.eos_id)]
  im_end = tokenizer.special_ids.get("<|im_end|>")
  if im_end is not None and im_end not in eos:
    eos.append(int(im_end))
  return {"bos_token_id": int(tokenizer.bos_id), "eos_token_id": eos if len(eos) > 1 else eos[0],
          "pad_token_id": int(tokenizer.pad_id)}


def generation_config(token_ids: dict[str, Any]) -> dict[str, Any]:
  out = dict(GENERATION_DEFAULTS)
  out.update({k: v for k, v in token_ids.items() if v is not None})
  return out


def import_hf_dir(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "float32", step: int = 0,
                  stage: str = "hf_import") -> Any:
  """HF directory -> params-only checkpoint at ``dst`` (appears atomically). Returns the ModelConfig."""
  from nanbeige_jax import checkpoint
  cfg, params = hf.load_hf_params(src, param_dtype=dtype)
  metadata = checkpoint.build_metadata(
      cfg, stage=stage, extra={"hf_source": str(Path(src).absolute()), "hf_config": hf.read_hf_config(src),
                               "hf_dtype": hf_stored_dtype(src)})
  with atomic_directory(dst) as tmp:
    checkpoint.save_params_checkpoint(str(tmp), params, metadata, step=step)
  return cfg


def _default_dtype(metadata: dict, params: Any) -> str:
  recorded = (metadata.get("extra") or {}).get("hf_dtype")
  if recorded in hf.HF_DTYPES:
    return recorded
  import jax
  dtypes = {np.dtype(x.dtype).name for x in jax.tree.leaves(params)}
  return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in hf.HF_DTYPES else "float32"


def _token_ids(src: Path, metadata: dict, tokenizer_path: str | os.PathLike | None) -> dict[str, Any]:
  from nanbeige_jax.data.tokenizer import Tokenizer
  if tokenizer_path is not None:
    return token_ids_from_tokenizer(Tokenizer.load(tokenizer_path))
  recorded = (metadata.get("extra") or {}).get("hf_config") or {}
  ids = {k: recorded.get(k) for k in _TOKEN_KEYS if recorded.get(k) is not None}
  if ids:
    return ids
  beside = src.absolute().parent / "tokenizer.model"
  if beside.is_file():
    return token_ids_from_tokenizer(Tokenizer.load(beside))
  return {}


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                      step: int | None = None, max_shard_size: int | str = "2GB",
                      tokenizer_path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Checkpoint step (None: latest) -> HF directory at ``dst`` (appears atomically; must not exist). Returns what
  was written: ``files``, ``dtype``, ``rope_theta``, ``token_ids``."""
  from nanbeige_jax import checkpoint
  params, metadata = checkpoint.load_params_checkpoint(src, step=step)
  cfg = checkpoint.model_config_from_metadata(metadata, str(src))
  dtype = dtype or _default_dtype(metadata, params)
  token_ids = _token_ids(Path(src), metadata, tokenizer_path)
  extra_files = {GENERATION_CONFIG_FILE: json.dumps(generation_config(token_ids), indent=2, sort_keys=True) + "\n"}
  files = save_hf_dir(dst, cfg, params, dtype=dtype, max_shard_size=max_shard_size, token_ids=token_ids,
                         extra_files=extra_files)
  return {"files": files, "dtype": dtype, "rope_theta": cfg.rope_theta, "token_ids": token_ids}


# Writing a Hugging Face directory
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """'2GB' -> 2e9 bytes (decimal units as transformers; KiB/MiB/GiB binary); ints pass through."""
  if isinstance(size, int) and not isinstance(size, bool):
    value = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
      raise ValueError(f"size {size!r}: expected a number with an optional unit {sorted(_SIZE_UNITS)[1:]}, "
                       "e.g. '2GB'")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
  if value <= 0:
    raise ValueError(f"size {size!r}: expected a positive size")
  return value


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike) -> Iterator[Path]:
  """Yield a fresh temporary sibling of ``dst``; on success it is renamed to ``dst``, on any error removed.
  ``dst`` must not exist yet (an existing directory is never overwritten)."""
  dst = Path(dst).absolute()
  if dst.exists():
    raise FileExistsError(f"{dst}: already exists; refusing to overwrite")
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    yield tmp
    if dst.exists():
      raise FileExistsError(f"{dst}: appeared while it was being written; refusing to overwrite")
    os.replace(tmp, dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int) -> list[list[TensorSpec]]:
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for s in specs:
    nbytes = int(np.prod(s.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(s)
    size += nbytes
  return shards


def save_hf_dir(hf_dir: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any], *,
                dtype: str = "bfloat16", max_shard_size: int | str = "2GB", token_ids: Mapping[str, Any] | None = None,
                extra_files: Mapping[str, str] | None = None) -> list[str]:
  """Write native params as a Hugging Face Llama directory (config.json + safetensors, sharded with an index
  above ``max_shard_size``; ``token_ids`` go into config.json, ``extra_files`` name -> text are written beside).
  The directory appears atomically. Returns the weight file names."""
  from safetensors.numpy import save_file
  if dtype not in HF_DTYPES:
    raise ValueError(f"save_hf_dir: dtype must be one of {HF_DTYPES}, found {dtype!r}")
  max_shard_bytes = parse_size(max_shard_size)
  validate_native_params(cfg, params)
  out_dtype = np_dtype(dtype)
  specs = tensor_specs(cfg)
  shards = _plan_shards(specs, out_dtype.itemsize, max_shard_bytes)
  n = len(shards)
  names = [SINGLE_WEIGHTS_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
  with atomic_directory(hf_dir) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(hf_config_from_model(cfg, dtype, token_ids), indent=2,
                                              sort_keys=True) + "\n")
    for name, text in (extra_files or {}).items():
      (tmp / name).write_text(text)
    weight_map: dict[str, str] = {}
    total_size = 0
    for file_name, shard in zip(names, shards):
      tensors = {}
      for s in shard:
        leaf = _get_path(params, s.native_path)
        native = np.asarray(leaf if s.layer is None else leaf[s.layer])
        tensors[s.hf_name] = np.ascontiguousarray(s.to_hf(native).astype(out_dtype, copy=False))
        weight_map[s.hf_name] = file_name
        total_size += tensors[s.hf_name].nbytes
      save_file(tensors, str(tmp / file_name), metadata={"format": "pt"})
      del tensors
    if n > 1:
      index = {"metadata": {"total_size": total_size, "total_parameters": cfg.num_params()},
               "weight_map": weight_map}
      (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return names


# --------------------------------------------------------------------------------------------------------------
# Parity with transformers
# --------------------------------------------------------------------------------------------------------------
