"""Hugging Face Llama interop: config mapping, streaming safetensors import/export, logits parity.

The Hugging Face side is a ``LlamaForCausalLM`` directory: ``config.json`` plus either one ``model.safetensors``
or shards ``model-0000k-of-0000n.safetensors`` with ``model.safetensors.index.json``. The native side is the
pure-dict parameter tree of :class:`nanbeige_jax.model.Decoder` (layers stacked on axis 0).

Layout mapping (HF linear weights are (out, in); ours are (in, ..., out)-shaped einsum operands):

=============================================  ==================  =========================================
HF tensor                                      HF shape            native leaf (per-layer shape)
=============================================  ==================  =========================================
model.embed_tokens.weight                      (V, D)              embed (V, D)
model.layers.{i}.input_layernorm.weight        (D,)                layers/input_norm/scale[i] (D,)
model.layers.{i}.self_attn.q_proj.weight       (H*Dh, D)           layers/attn/q_proj[i] (D, H, Dh)
model.layers.{i}.self_attn.{k,v}_proj.weight   (K*Dh, D)           layers/attn/{k,v}_proj[i] (D, K, Dh)
model.layers.{i}.self_attn.o_proj.weight       (D, H*Dh)           layers/attn/o_proj[i] (H, Dh, D)
model.layers.{i}.post_attention_layernorm...   (D,)                layers/post_attn_norm/scale[i] (D,)
model.layers.{i}.mlp.{gate,up}_proj.weight     (F, D)              layers/mlp/{gate,up}[i] (D, F)
model.layers.{i}.mlp.down_proj.weight          (D, F)              layers/mlp/down[i] (F, D)
model.norm.weight                              (D,)                final_norm/scale (D,)
lm_head.weight (absent when tied)              (V, D)              lm_head (D, V)
=============================================  ==================  =========================================

Every matrix maps as ``native = hf.T.reshape(native_shape)`` and back as ``hf = native.reshape(hf_shape[::-1]).T``,
which is exact, so HF -> native -> HF is bit-identical. Reads and writes go tensor by tensor: the import fills
preallocated native arrays, the export holds at most one shard's worth of converted tensors. Every directory this
module writes appears atomically (temporary sibling + ``os.replace``) or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from nanbeige_jax.model.config import ModelConfig

CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_DTYPES = ("float32", "bfloat16")
# Non-parameter buffers some older checkpoints carry; they are recomputed from rope_theta, never loaded.
_IGNORED_TENSOR = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_FLOAT_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16"}


class HFFormatError(ValueError):
  """A Hugging Face directory, config or tensor that cannot be read as (or written from) our model."""


def np_dtype(name: str) -> np.dtype:
  """numpy dtype for a dtype name, bfloat16 included (via ml_dtypes)."""
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


# --------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# --------------------------------------------------------------------------------------------------------------
def _rope_theta_from_hf(config_json: Mapping[str, Any]) -> float:
  rope_parameters = config_json.get("rope_parameters")
  theta = None
  if rope_parameters is not None:
    if not isinstance(rope_parameters, Mapping):
      raise HFFormatError(f"config.json rope_parameters: expected an object, found {rope_parameters!r}")
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type != "default":
      raise HFFormatError(f"config.json rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is supported "
                          "(no scaling: linear/dynamic/yarn/llama3 cannot be represented)")
    unknown = sorted(set(rope_parameters) - {"rope_type", "type", "rope_theta"})
    if unknown:
      raise HFFormatError(f"config.json rope_parameters has unsupported keys {unknown}")
    theta = rope_parameters.get("rope_theta")
  top = config_json.get("rope_theta")
  if theta is not None and top is not None and float(theta) != float(top):
    raise HFFormatError(f"config.json disagrees with itself: rope_theta={top!r} but "
                        f"rope_parameters.rope_theta={theta!r}")
  theta = theta if theta is not None else top
  return 10000.0 if theta is None else float(theta)  # transformers' LlamaConfig default


def model_config_from_hf(config_json: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """A Llama ``config.json`` (as a dict) -> ModelConfig. ``overrides`` set non-architecture fields (param_dtype,
  dtype, scan_layers, ...). Raises HFFormatError for anything our decoder cannot represent."""
  cfg_json = dict(config_json)
  architectures = cfg_json.get("architectures") or []
  model_type = cfg_json.get("model_type")
  if model_type != "llama" and "LlamaForCausalLM" not in architectures:
    raise HFFormatError(f"config.json: expected a Llama model (model_type 'llama' / LlamaForCausalLM), found "
                        f"model_type={model_type!r}, architectures={architectures!r}")
  scaling = cfg_json.get("rope_scaling")
  if scaling is not None and not (isinstance(scaling, Mapping) and set(scaling) <= {"rope_type", "type", "rope_theta"}
                                  and scaling.get("rope_type", scaling.get("type")) == "default"):
    raise HFFormatError(f"config.json rope_scaling={scaling!r}: RoPE scaling is not supported (expected null or "
                        "{'rope_type': 'default'})")
  if scaling is not None and scaling.get("rope_theta") is not None:
    top = cfg_json.get("rope_theta")
    if top is not None and float(top) != float(scaling["rope_theta"]):
      raise HFFormatError(f"config.json disagrees with itself: rope_theta={top!r} but rope_scaling.rope_theta="
                          f"{scaling['rope_theta']!r}")
    cfg_json.setdefault("rope_theta", scaling["rope_theta"])
  checks = {"attention_bias": (False, "no q/k/v/o biases"), "mlp_bias": (False, "no MLP biases"),
            "hidden_act": ("silu", "SwiGLU with silu")}
  for key, (expected, meaning) in checks.items():
    found = cfg_json.get(key, expected)
    if found != expected:
      raise HFFormatError(f"config.json {key}={found!r}: our decoder supports only {key}={expected!r} ({meaning})")
  if float(cfg_json.get("attention_dropout", 0.0) or 0.0) != 0.0:
    raise HFFormatError(f"config.json attention_dropout={cfg_json['attention_dropout']!r}: dropout is not "
                        "supported (expected 0.0)")
  required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in required if cfg_json.get(k) is None]
  if missing:
    raise HFFormatError(f"config.json is missing required field(s) {missing}")
  num_heads = cfg_json["num_attention_heads"]
  num_kv_heads = cfg_json.get("num_key_value_heads") or num_heads
  head_dim = cfg_json.get("head_dim")
  if head_dim is None:
    if cfg_json["hidden_size"] % num_heads:
      raise HFFormatError(f"config.json has no head_dim and hidden_size={cfg_json['hidden_size']} is not a "
                          f"multiple of num_attention_heads={num_heads}")
    head_dim = cfg_json["hidden_size"] // num_heads
  fields = dict(
      vocab_size=cfg_json["vocab_size"], hidden_size=cfg_json["hidden_size"],
      num_layers=cfg_json["num_hidden_layers"], num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      intermediate_size=cfg_json["intermediate_size"], rms_norm_eps=float(cfg_json.get("rms_norm_eps", 1e-6)),
      rope_theta=_rope_theta_from_hf(cfg_json),
      max_position_embeddings=cfg_json.get("max_position_embeddings", 2048),
      tie_word_embeddings=bool(cfg_json.get("tie_word_embeddings", False)),
      initializer_range=float(cfg_json.get("initializer_range", 0.02)))
  arch_overrides = sorted(set(overrides) & set(fields))
  if arch_overrides:
    raise ValueError(f"model_config_from_hf: {arch_overrides} come from config.json and cannot be overridden")
  try:
    return ModelConfig(**fields).replace(**overrides)
  except ValueError as e:
    raise HFFormatError(f"config.json cannot be represented: {e}") from e


def hf_config_from_model(cfg: ModelConfig, dtype: str = "bfloat16",
                         token_ids: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """ModelConfig -> a Llama ``config.json`` dict that transformers 4.x and 5.x both load (rope_theta is written
  both at top level and in rope_parameters). ``token_ids``: bos_token_id / eos_token_id / pad_token_id to record."""
  if dtype not in HF_DTYPES:
    raise ValueError(f"hf_config_from_model: dtype must be one of {HF_DTYPES}, found {dtype!r}")
  ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
  unknown = sorted(set(ids) - {"bos_token_id", "eos_token_id", "pad_token_id"})
  if unknown:
    raise ValueError(f"hf_config_from_model: unknown token id key(s) {unknown}")
  return ids | {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "initializer_range": cfg.initializer_range,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": float(cfg.rope_theta),
      "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
  }


# --------------------------------------------------------------------------------------------------------------
# Tensor mapping
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor and where it lives in the native tree. ``layer`` indexes the stacked axis (None = unstacked);
  ``transpose``: native = hf.T.reshape(native_shape)."""
  hf_name: str
  native_path: tuple[str, ...]
  layer: int | None
  hf_shape: tuple[int, ...]
  native_shape: tuple[int, ...]  # per layer
  transpose: bool
  hint: str  # which config.json fields determine the shape (for error messages)

  def to_native(self, hf_tensor: np.ndarray) -> np.ndarray:
    return hf_tensor.T.reshape(self.native_shape) if self.transpose else hf_tensor

  def to_hf(self, native_tensor: np.ndarray) -> np.ndarray:
    if not self.transpose:
      return native_tensor
    return native_tensor.reshape(self.hf_shape[::-1]).T


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """Every HF tensor of a model with this config, in HF's order."""
  v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
  h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  specs = [TensorSpec("model.embed_tokens.weight", ("embed",), None, (v, d), (v, d), False,
                      "vocab_size, hidden_size")]
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    specs += [
        TensorSpec(p + "input_layernorm.weight", ("layers", "input_norm", "scale"), i, (d,), (d,), False,
                   "hidden_size"),
        TensorSpec(p + "self_attn.q_proj.weight", ("layers", "attn", "q_proj"), i, (h * hd, d), (d, h, hd), True,
                   "num_attention_heads * head_dim, hidden_size"),
        TensorSpec(p + "self_attn.k_proj.weight", ("layers", "attn", "k_proj"), i, (k * hd, d), (d, k, hd), True,
                   "num_key_value_heads * head_dim, hidden_size"),
        TensorSpec(p + "self_attn.v_proj.weight", ("layers", "attn", "v_proj"), i, (k * hd, d), (d, k, hd), True,
                   "num_key_value_heads * head_dim, hidden_size"),
        TensorSpec(p + "self_attn.o_proj.weight", ("layers", "attn", "o_proj"), i, (d, h * hd), (h, hd, d), True,
                   "hidden_size, num_attention_heads * head_dim"),
        TensorSpec(p + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), i, (d,), (d,),
                   False, "hidden_size"),
        TensorSpec(p + "mlp.gate_proj.weight", ("layers", "mlp", "gate"), i, (f, d), (d, f), True,
                   "intermediate_size, hidden_size"),
        TensorSpec(p + "mlp.up_proj.weight", ("layers", "mlp", "up"), i, (f, d), (d, f), True,
                   "intermediate_size, hidden_size"),
        TensorSpec(p + "mlp.down_proj.weight", ("layers", "mlp", "down"), i, (d, f), (f, d), True,
                   "hidden_size, intermediate_size"),
    ]
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (d,), (d,), False, "hidden_size"))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), None, (v, d), (d, v), True, "vocab_size, hidden_size"))
  return specs


def native_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Native leaf path -> full (stacked) shape."""
  shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
  for spec in tensor_specs(cfg):
    shapes[spec.native_path] = ((cfg.num_layers,) if spec.layer is not None else ()) + spec.native_shape
  return shapes


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  node: Any = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      raise HFFormatError(f"native params: missing leaf {'/'.join(path)}")
    node = node[key]
  return node


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _leaf_paths(value, prefix + (str(key),))
    else:
      yield prefix + (str(key),)


def validate_native_params(cfg: ModelConfig, params: Mapping[str, Any]) -> None:
  """Raise HFFormatError unless ``params`` has exactly the leaves and shapes of ``cfg``'s decoder."""
  expected = native_shapes(cfg)
  found = set(_leaf_paths(params))
  missing = sorted("/".join(p) for p in set(expected) - found)
  extra = sorted("/".join(p) for p in found - set(expected))
  if missing or extra:
    raise HFFormatError(f"native params do not match the model config: missing leaves {missing}, "
                        f"unexpected leaves {extra}")
  for path, shape in expected.items():
    found_shape = tuple(_get_path(params, path).shape)
    if found_shape != shape:
      raise HFFormatError(f"native param {'/'.join(path)}: expected shape {shape}, found {found_shape}")


# --------------------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory
# --------------------------------------------------------------------------------------------------------------
def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
  hf_dir = Path(hf_dir)
  if not hf_dir.is_dir():
    raise HFFormatError(f"{hf_dir}: not a directory")
  path = hf_dir / CONFIG_FILE
  if not path.is_file():
    raise HFFormatError(f"{path}: missing (a Hugging Face model directory needs config.json)")
  try:
    config_json = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
  if not isinstance(config_json, dict):
    raise HFFormatError(f"{path}: expected a JSON object, found {type(config_json).__name__}")
  return config_json


@dataclasses.dataclass(frozen=True)
class _StoredTensor:
  file: str
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype code (F32, BF16, ...)


def _weight_files(hf_dir: Path) -> dict[str, str]:
  """HF tensor name -> file name (relative to hf_dir), from the index json or the single weights file."""
  index_path = hf_dir / INDEX_FILE
  if index_path.is_file():
    try:
      index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
      raise HFFormatError(f"{index_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
      raise HFFormatError(f"{index_path}: expected a non-empty 'weight_map' object")
    for file_name in sorted(set(weight_map.values())):
      if not (hf_dir / file_name).is_file():
        raise HFFormatError(f"{index_path}: shard {file_name!r} listed in weight_map is missing from {hf_dir}")
    return dict(weight_map)
  single = hf_dir / SINGLE_WEIGHTS_FILE
  if single.is_file():
    from safetensors import safe_open
    with safe_open(str(single), framework="numpy") as f:
      return {name: SINGLE_WEIGHTS_FILE for name in f.keys()}
  present = sorted(p.name for p in hf_dir.iterdir())
  raise HFFormatError(f"{hf_dir}: no weights found (expected {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}); "
                      f"directory holds {present}")


def _stored_tensors(hf_dir: Path, weight_map: Mapping[str, str]) -> dict[str, _StoredTensor]:
  """Shapes and dtypes of every tensor, read from the safetensors headers (no tensor data is loaded)."""
  from safetensors import safe_open
  by_file: dict[str, list[str]] = {}
  for name, file_name in weight_map.items():
    by_file.setdefault(file_name, []).append(name)
  stored: dict[str, _StoredTensor] = {}
  for file_name, names in sorted(by_file.items()):
    with safe_open(str(hf_dir / file_name), framework="numpy") as f:
      in_file = set(f.keys())
      for name in names:
        if name not in in_file:
          raise HFFormatError(f"{hf_dir / INDEX_FILE}: tensor {name} is mapped to {file_name}, which does not "
                              "contain it")
        view = f.get_slice(name)
        stored[name] = _StoredTensor(file_name, tuple(view.get_shape()), str(view.get_dtype()))
  return stored


def _check_stored_against_config(hf_dir: Path, cfg: ModelConfig,
                                 stored: Mapping[str, _StoredTensor]) -> list[TensorSpec]:
  specs = tensor_specs(cfg)
  expected = {s.hf_name for s in specs}
  tied_copy = cfg.tie_word_embeddings and "lm_head.weight" in stored
  missing = [s.hf_name for s in specs if s.hf_name not in stored]
  if missing:
    raise HFFormatError(f"{hf_dir}: missing tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} "
                        f"({len(missing)} missing) required by config.json")
  extra = sorted(n for n in stored if n not in expected and not _IGNORED_TENSOR.match(n)
                 and not (tied_copy and n == "lm_head.weight"))
  if extra:
    raise HFFormatError(f"{hf_dir}: unexpected tensor(s) {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                        "that our Llama decoder has no place for (does config.json match the weights?)")
  for s in specs:
    found = stored[s.hf_name]
    if found.shape != s.hf_shape:
      raise HFFormatError(f"tensor {s.hf_name} in {found.file}: expected shape {s.hf_shape} ({s.hint} from "
                          f"config.json), found {found.shape}")
    if found.dtype not in _FLOAT_SAFETENSORS_DTYPES:
      raise HFFormatError(f"tensor {s.hf_name} in {found.file}: expected a float dtype "
                          f"{sorted(_FLOAT_SAFETENSORS_DTYPES)}, found {found.dtype}")
  if tied_copy and stored["lm_head.weight"].shape != (cfg.vocab_size, cfg.hidden_size):
    raise HFFormatError(f"tensor lm_head.weight in {stored['lm_head.weight'].file}: expected shape "
                        f"{(cfg.vocab_size, cfg.hidden_size)}, found {stored['lm_head.weight'].shape}")
  return specs


def load_hf_params(hf_dir: str | os.PathLike, *, param_dtype: str = "float32",
                   **config_overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """Read a Hugging Face Llama directory into (ModelConfig, native pure-dict params of numpy arrays).

  The native arrays are allocated once in ``param_dtype`` and filled tensor by tensor; every name, shape and dtype
  is checked from the safetensors headers before any tensor data is read."""
  from safetensors import safe_open
  hf_dir = Path(hf_dir)
  cfg = model_config_from_hf(read_hf_config(hf_dir), param_dtype=param_dtype, **config_overrides)
  stored = _stored_tensors(hf_dir, _weight_files(hf_dir))
  specs = _check_stored_against_config(hf_dir, cfg, stored)
  dtype = np_dtype(param_dtype)
  params: dict[str, Any] = {}
  for path, shape in native_shapes(cfg).items():
    _set_path(params, path, np.empty(shape, dtype))
  by_file: dict[str, list[TensorSpec]] = {}
  for s in specs:
    by_file.setdefault(stored[s.hf_name].file, []).append(s)
  for file_name, file_specs in sorted(by_file.items()):
    with safe_open(str(hf_dir / file_name), framework="numpy") as f:
      for s in file_specs:
        target = _get_path(params, s.native_path)
        value = s.to_native(f.get_tensor(s.hf_name))
        if s.layer is None:
          target[...] = value.astype(dtype, copy=False)
        else:
          target[s.layer] = value.astype(dtype, copy=False)
  if cfg.tie_word_embeddings and "lm_head.weight" in stored:
    file_name = stored["lm_head.weight"].file
    with safe_open(str(hf_dir / file_name), framework="numpy") as f:
      lm_head = f.get_tensor("lm_head.weight").astype(dtype, copy=False)
    if not np.array_equal(lm_head, params["embed"]):
      raise HFFormatError(f"{hf_dir}: config.json says tie_word_embeddings=true but lm_head.weight in {file_name} "
                          "differs from model.embed_tokens.weight")
  return cfg, params
