"""Hugging Face Llama interop: config mapping, logits parity against transformers, bit-exact round trips, the
convert/parity launchers as subprocesses, and clear errors (with no half-written output) on bad input."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from safetensors import safe_open

from nanbeige_jax import hf, hf_export, hf_parity
from nanbeige_jax.model import ModelConfig, get_preset

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, rope_theta=5e6, rms_norm_eps=1e-5, max_position_embeddings=512)
TOLERANCE = 1e-4


def _hf_model(tie: bool, seed: int) -> transformers.LlamaForCausalLM:
  """Random-init tiny Llama: GQA 4/2, head_dim 24 != 64/4, rope_theta 5e6, RMSNorm weights perturbed away from 1."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=tie, **TINY))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model.eval()


def _read_all(hf_dir: Path) -> dict[str, np.ndarray]:
  out = {}
  for path in sorted(hf_dir.glob("*.safetensors")):
    with safe_open(str(path), framework="numpy") as f:
      for name in f.keys():
        assert name not in out, f"{name} stored twice"
        out[name] = f.get_tensor(name)
  return out


def _subprocess_env() -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device is enough for a tiny model
  return env


def _run(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], capture_output=True, text=True,
                        env=_subprocess_env(), timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  """(model, sharded fp32 dir written by transformers' save_pretrained)."""
  model = _hf_model(tie=False, seed=0)
  d = tmp_path_factory.mktemp("hf") / "untied"
  model.save_pretrained(d, max_shard_size="60KB")
  assert (d / hf.INDEX_FILE).is_file() and len(list(d.glob("model-*-of-*.safetensors"))) > 1
  return model, d


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  model = _hf_model(tie=True, seed=1)
  d = tmp_path_factory.mktemp("hf") / "tied"
  model.save_pretrained(d)
  assert (d / hf.SINGLE_WEIGHTS_FILE).is_file() and not (d / hf.INDEX_FILE).exists()
  return model, d


# --- config ---------------------------------------------------------------------------------------------------
def test_config_round_trip_and_transformers_forms(untied):
  cfg = get_preset("test", tie_word_embeddings=True)
  back = hf.model_config_from_hf(hf.hf_config_from_model(cfg))
  assert back.arch_dict() == cfg.arch_dict() and back.rope_theta == cfg.rope_theta
  assert back.max_position_embeddings == cfg.max_position_embeddings
  # transformers 5 writes rope_theta only inside rope_parameters.
  written = json.loads((untied[1] / "config.json").read_text())
  assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"] == 5e6
  cfg = hf.model_config_from_hf(written, dtype="float32")
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings, cfg.dtype) == (
      4, 2, 24, 5e6, False, "float32")
  # Older configs: top-level rope_theta, rope_scaling null, no head_dim / num_key_value_heads.
  legacy = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 8, "rope_theta": 1e6, "rope_scaling": None}
  cfg = hf.model_config_from_hf(legacy)
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (8, 8, 1e6)
  # rope_scaling {"rope_type": "default"} means no scaling (issue 11 item 7: it was refused).
  for scaling in ({"rope_type": "default"}, {"type": "default"}):
    assert hf.model_config_from_hf(dict(legacy, rope_scaling=scaling)).rope_theta == 1e6
  # Both of our rope forms are read back by transformers itself.
  loaded = transformers.LlamaConfig.from_dict(hf.hf_config_from_model(get_preset("test")))
  assert loaded.rope_parameters["rope_theta"] == 5e6 and loaded.head_dim == 24


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "default", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}, "disagrees"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "expected a Llama model"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads=3"),
])
def test_config_rejects_what_we_cannot_represent(change, message):
  config_json = {**hf.hf_config_from_model(get_preset("test")), **change}
  with pytest.raises(hf.HFFormatError, match=message.replace("(", r"\(").replace("[", r"\[")):
    hf.model_config_from_hf(config_json)


# --- parity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_logits_parity_with_transformers(which, request):
  _, d = request.getfixturevalue(which)
  cfg, _ = hf.load_hf_params(d)
  assert cfg.tie_word_embeddings == (which == "tied") and cfg.head_dim * cfg.num_heads != cfg.hidden_size
  report = hf_parity.check_parity(d, batch=2, seq_len=32, seed=0)
  assert report.shape == (2, 32, 256)
  assert report.max_abs_diff <= TOLERANCE, str(report)
  assert report.argmax_agreement == 1.0, str(report)
  assert report.max_abs_logit > 0.1  # the logits are not degenerate


def test_check_parity_script(untied):
  _, d = untied
  ok = _run("check_parity.py", f"--hf_dir={d}", "--tolerance=1e-4", "--batch=2", "--seq_len=16", "--seed=3")
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "PASS" in ok.stdout and "argmax agreement = 100.0000%" in ok.stdout
  # fp32 rounding differs between XLA and torch, so an exact (zero) tolerance is a real, unmeetable bound.
  strict = _run("check_parity.py", f"--hf_dir={d}", "--tolerance=0", "--seq_len=16", "--seed=3")
  assert strict.returncode == 1, strict.stderr[-3000:]
  assert "FAIL" in strict.stdout
  max_diff = float(strict.stdout.split("max |diff| = ")[1].split()[0])
  assert 0 < max_diff <= TOLERANCE
  bad = _run("check_parity.py", f"--hf_dir={d}", "--tolerance=-1")
  assert bad.returncode != 0 and "--tolerance must be >= 0" in bad.stderr
  missing = _run("check_parity.py", f"--hf_dir={d}_nonexistent")
  assert missing.returncode == 2 and f"check_parity: error: {d}_nonexistent: not a directory" in missing.stderr


# --- round trips ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_hf_native_hf_round_trip_is_bit_identical(untied, tied, tmp_path, dtype, param_dtype):
  for model, _ in (untied, tied):
    src = tmp_path / f"src_{model.config.tie_word_embeddings}"
    copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(src)
    if dtype == "float32" and param_dtype == "bfloat16":
      continue  # fp32 -> bf16 params is lossy by design
    cfg, params = hf.load_hf_params(src, param_dtype=param_dtype)
    assert params["layers"]["attn"]["q_proj"].dtype == hf.np_dtype(param_dtype)
    out = tmp_path / f"out_{model.config.tie_word_embeddings}"
    hf_export.save_hf_dir(out, cfg, params, dtype=dtype, max_shard_size="50KB")
    original, exported = _read_all(src), _read_all(out)
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
      assert exported[name].dtype == hf.np_dtype(dtype), name
      assert exported[name].shape == value.shape, name
      assert np.array_equal(exported[name].view(np.uint8), value.view(np.uint8)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_native_layout_matches_hf_weights(untied):
  model, d = untied
  _, params = hf.load_hf_params(d)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  q = sd["model.layers.1.self_attn.q_proj.weight"]  # (H*Dh, D)
  np.testing.assert_array_equal(params["layers"]["attn"]["q_proj"][1], q.T.reshape(64, 4, 24))
  o = sd["model.layers.0.self_attn.o_proj.weight"]  # (D, H*Dh)
  np.testing.assert_array_equal(params["layers"]["attn"]["o_proj"][0], o.T.reshape(4, 24, 64))
  np.testing.assert_array_equal(params["layers"]["mlp"]["down"][1], sd["model.layers.1.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
  np.testing.assert_array_equal(params["layers"]["post_attn_norm"]["scale"][1],
                                sd["model.layers.1.post_attention_layernorm.weight"])


def test_shard_planning_and_sizes():
  assert hf_export.parse_size("2GB") == 2 * 10**9 and hf_export.parse_size("1GiB") == 2**30
  assert hf_export.parse_size(123) == 123
  for bad in ("2XB", "-1GB", "", 0):
    with pytest.raises(ValueError):
      hf_export.parse_size(bad)


# --- launcher round trip --------------------------------------------------------------------------------------
def test_convert_script_both_ways(untied, tmp_path):
  from nanbeige_jax import checkpoint
  model, d = untied
  native = tmp_path / "native"
  imported = _run("convert_hf.py", "--direction=hf_to_native", f"--src={d}", f"--dst={native}", "--step=7")
  assert imported.returncode == 0, imported.stderr[-3000:]
  params, metadata = checkpoint.load_params_checkpoint(str(native))
  assert metadata["stage"] == "hf_import"
  cfg = ModelConfig.from_dict(metadata["model_config"])
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.param_dtype) == (24, 2, 5e6, "float32")
  hf.validate_native_params(cfg, params)

  exported_dir = tmp_path / "exported"
  exported = _run("convert_hf.py", "--direction=native_to_hf", f"--src={native}", f"--dst={exported_dir}",
                  "--dtype=float32", "--max_shard_size=40KB")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (exported_dir / hf.INDEX_FILE).is_file()
  original = _read_all(d)
  for name, value in _read_all(exported_dir).items():
    assert np.array_equal(value, original[name]), name
  reloaded = transformers.LlamaForCausalLM.from_pretrained(exported_dir, dtype=torch.float32).eval()
  tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 16)))
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy())

  # The default dtype is the one recorded at import (float32 here): the default round trip is lossless.
  default_dir = tmp_path / "exported_default"
  exported = _run("convert_hf.py", "--direction=native_to_hf", f"--src={native}", f"--dst={default_dir}")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert metadata["extra"]["hf_dtype"] == "float32"
  for name, value in _read_all(default_dir).items():
    assert value.dtype == np.float32 and np.array_equal(value, original[name]), name

  bf16_dir = tmp_path / "exported_bf16"
  exported = _run("convert_hf.py", "--direction=native_to_hf", f"--src={native}", f"--dst={bf16_dir}",
                  "--dtype=bfloat16")
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert (bf16_dir / hf.SINGLE_WEIGHTS_FILE).is_file()
  stored = _read_all(bf16_dir)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in stored.values())
  bf16_model = transformers.LlamaForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    diff = (bf16_model(tokens).logits - model(tokens).logits).abs().max().item()
  assert 0 < diff < 0.05  # bf16 weight rounding only
  # The destination must not exist; nothing is overwritten.
  again = _run("convert_hf.py", "--direction=native_to_hf", f"--src={native}", f"--dst={bf16_dir}",
               "--dtype=bfloat16")
  assert again.returncode != 0 and "already exists" in again.stderr


# --- bad input ------------------------------------------------------------------------------------------------
def _single_file_copy(src_model, tmp_path: Path, name: str) -> tuple[Path, dict[str, np.ndarray]]:
  d = tmp_path / name
  src_model.save_pretrained(d)
  return d, safetensors.numpy.load_file(str(d / hf.SINGLE_WEIGHTS_FILE))


def _rewrite(d: Path, tensors: dict[str, np.ndarray]) -> None:
  safetensors.numpy.save_file(tensors, str(d / hf.SINGLE_WEIGHTS_FILE), metadata={"format": "pt"})


def test_bad_input_names_tensor_and_shapes(untied, tied, tmp_path):
  model, _ = untied
  d, tensors = _single_file_copy(model, tmp_path, "missing")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _rewrite(d, tensors)
  with pytest.raises(hf.HFFormatError, match=r"missing tensor\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
    hf.load_hf_params(d)

  d, tensors = _single_file_copy(model, tmp_path, "wrong_shape")
  tensors["model.layers.1.self_attn.q_proj.weight"] = np.zeros((80, 64), np.float32)
  _rewrite(d, tensors)
  with pytest.raises(hf.HFFormatError, match=r"tensor model.layers.1.self_attn.q_proj.weight in model.safetensors: "
                     r"expected shape \(96, 64\) .* found \(80, 64\)"):
    hf.load_hf_params(d)

  d, tensors = _single_file_copy(model, tmp_path, "extra")
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((96,), np.float32)
  _rewrite(d, tensors)
  with pytest.raises(hf.HFFormatError, match=r"unexpected tensor\(s\) \['model.layers.0.self_attn.q_proj.bias'\]"):
    hf.load_hf_params(d)

  d, _ = _single_file_copy(model, tmp_path, "kv_heads")
  config_json = json.loads((d / "config.json").read_text())
  config_json["num_key_value_heads"] = 4
  (d / "config.json").write_text(json.dumps(config_json))
  with pytest.raises(hf.HFFormatError, match=r"tensor model.layers.0.self_attn.k_proj.weight in model.safetensors: "
                     r"expected shape \(96, 64\) \(num_key_value_heads \* head_dim, hidden_size from config.json\), "
                     r"found \(48, 64\)"):
    hf.load_hf_params(d)

  d, tensors = _single_file_copy(tied[0], tmp_path, "tied_differs")
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
  _rewrite(d, tensors)
  with pytest.raises(hf.HFFormatError, match="tie_word_embeddings=true but lm_head.weight"):
    hf.load_hf_params(d)

  d, _ = _single_file_copy(model, tmp_path, "no_config")
  (d / "config.json").unlink()
  with pytest.raises(hf.HFFormatError, match=r"config.json: missing"):
    hf.load_hf_params(d)
  d, _ = _single_file_copy(model, tmp_path, "no_weights")
  (d / hf.SINGLE_WEIGHTS_FILE).unlink()
  with pytest.raises(hf.HFFormatError, match=r"no weights found \(expected model.safetensors"):
    hf.load_hf_params(d)
  (d / "config.json").write_text('{"model_type": "llama",\n "vocab_size": }')
  with pytest.raises(hf.HFFormatError, match=r"config.json: invalid JSON at line 2"):
    hf.load_hf_params(d)


def test_missing_shard_and_index_mismatch(untied, tmp_path):
  _, src = untied
  d = tmp_path / "sharded"
  shutil.copytree(src, d)
  index = json.loads((d / hf.INDEX_FILE).read_text())
  some_shard = sorted(set(index["weight_map"].values()))[1]
  moved = d / some_shard
  moved.rename(tmp_path / "aside.safetensors")
  with pytest.raises(hf.HFFormatError, match=f"shard '{some_shard}' listed in weight_map is missing"):
    hf.load_hf_params(d)
  (tmp_path / "aside.safetensors").rename(moved)
  index["weight_map"]["model.norm.weight"] = some_shard  # the index points at a file without that tensor
  (d / hf.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(hf.HFFormatError, match=f"model.norm.weight is mapped to {some_shard}, which does not"):
    hf.load_hf_params(d)


def test_failed_conversion_leaves_no_output(untied, tmp_path, monkeypatch):
  model, src = untied
  cfg, params = hf.load_hf_params(src)
  # Wrong native params are rejected before anything is written.
  bad = {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"], "up": np.zeros((2, 64, 95))}}}
  parent = tmp_path / "out_parent"
  with pytest.raises(hf.HFFormatError, match=r"native param layers/mlp/up: expected shape \(2, 64, 96\), found "
                     r"\(2, 64, 95\)"):
    hf_export.save_hf_dir(parent / "hf", cfg, bad)
  assert not (parent / "hf").exists()
  # A failure in the middle of writing shards removes the partial output (the temp sibling too).
  real_save_file, calls = safetensors.numpy.save_file, []

  def failing_save_file(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) == 3:
      raise OSError("disk full (injected)")
    real_save_file(tensors, filename, metadata=metadata)
  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
  with pytest.raises(OSError, match="injected"):
    hf_export.save_hf_dir(parent / "hf", cfg, params, max_shard_size="30KB")
  assert len(calls) == 3 and os.listdir(parent) == []
  monkeypatch.undo()
  # The launcher fails cleanly on a config that disagrees with the weights and writes nothing.
  d = tmp_path / "mismatch"
  shutil.copytree(src, d)
  config_json = json.loads((d / "config.json").read_text())
  config_json["intermediate_size"] = 128
  (d / "config.json").write_text(json.dumps(config_json))
  dst = tmp_path / "never"
  result = _run("convert_hf.py", "--direction=hf_to_native", f"--src={d}", f"--dst={dst}")
  assert result.returncode == 1
  assert "convert_hf: error: tensor model.layers.0.mlp.gate_proj.weight in model-" in result.stderr
  assert "expected shape (128, 64) (intermediate_size, hidden_size from config.json), found (96, 64)" in result.stderr
  assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".never")) == []


def test_tolerated_extras_in_older_checkpoints(tied, tmp_path):
  """Older exports carry rotary inv_freq buffers and a duplicate lm_head for tied models; both are accepted."""
  model, src = tied
  d, tensors = _single_file_copy(model, tmp_path, "older")
  tensors["model.layers.1.self_attn.rotary_emb.inv_freq"] = np.ones((12,), np.float32)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
  _rewrite(d, tensors)
  cfg, params = hf.load_hf_params(d)
  _, reference = hf.load_hf_params(src)
  assert cfg.tie_word_embeddings and "lm_head" not in params
  for path in hf.native_shapes(cfg):
    np.testing.assert_array_equal(hf._get_path(params, path), hf._get_path(reference, path))


def test_export_writes_operative_theta_token_ids_and_generation_config(tmp_path):
  """Issue 11 items 1 and 7: a checkpoint trained at RoPE base 1e6 (the preset says 5e6) exports 1e6; config.json
  carries bos/eos/pad ids and generation_config.json the released sampling defaults."""
  from nanbeige_jax import checkpoint
  from nanbeige_jax.data.tokenizer import Tokenizer
  cfg = get_preset("test")
  assert cfg.rope_theta == 5e6
  text = "\n".join(f"line {i}: the quick brown fox thinks about {i * 7} apples and answers." for i in range(400))
  tok = Tokenizer.train([text], tmp_path / "workdir" / "tokenizer", 300)  # the run's <workdir>/tokenizer.model
  rng = np.random.default_rng(0)
  tree: dict = {}
  for path, shape in hf.native_shapes(cfg).items():
    hf._set_path(tree, path, rng.standard_normal(shape).astype(np.float32))
  ckpt = tmp_path / "workdir" / "checkpoints"
  metadata = checkpoint.build_metadata(cfg, stage="sft", rope_theta=1e6, phase="stable_2")
  checkpoint.save_params_checkpoint(ckpt, tree, metadata, step=3)
  out = hf_export.export_checkpoint(ckpt, tmp_path / "hf")
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert out["dtype"] == "float32" and out["rope_theta"] == 1e6
  assert config["rope_theta"] == 1e6 and config["rope_parameters"]["rope_theta"] == 1e6
  im_end = tok.special_ids["<|im_end|>"]
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, [3, im_end], 0)
  generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
  assert generation == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "bos_token_id": 2,
                        "eos_token_id": [3, im_end], "pad_token_id": 0}
  loaded = transformers.LlamaConfig.from_pretrained(tmp_path / "hf")
  assert loaded.rope_parameters["rope_theta"] == 1e6 and loaded.eos_token_id == [3, im_end]
  assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").temperature == 0.6
