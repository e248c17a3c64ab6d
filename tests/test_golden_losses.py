"""Golden per-step loss series: 30 steps of the tiny pre-training default and 30 of the SFT default (on a small
batch for speed), replayed through the real entrypoints (``run_pretrain``, ``run_sft``) and compared exactly with the
series recorded from the trainer before the stage template was introduced (``tests/golden/*.json``). A change to the
step, the loop, the objectives or the data path that moves any loss by one ulp fails here.

Re-record (only for an intentional numerical change, and say so in the commit):
  NANBEIGE_RECORD_GOLDEN=1 python -m pytest tests/test_golden_losses.py
"""
import json
import os
import pathlib

import gin
import pytest

from nanbeige_jax.config import build, parse_gin

GOLDEN = pathlib.Path(__file__).parent / "golden"
RECORD = os.environ.get("NANBEIGE_RECORD_GOLDEN") == "1"

PRETRAIN_BINDINGS = [
    "PretrainConfig.global_batch_size = 8", "PretrainConfig.seq_len = 64", "PretrainConfig.max_steps = 30",
    "PretrainConfig.log_every_steps = 1", "PretrainConfig.eval_every_steps = 1000",
    "PretrainConfig.checkpoint_every_steps = 1000", "PretrainConfig.eval_batches = 1", "PretrainConfig.plot = False",
    "PretrainConfig.tokenizer_vocab_size = 512", "PretrainConfig.tokenizer_train_docs = 40",
    "FGWSDSchedule.warmup_tokens = 4096",
]
SFT_BINDINGS = [
    "SFTConfig.global_batch_size = 8", "SFTConfig.seq_len = 128", "SFTConfig.max_steps = 30",
    "SFTConfig.log_every_steps = 1", "SFTConfig.eval_every_steps = 1000", "SFTConfig.eval_batches = 1",
    "SFTConfig.checkpoint_every_steps = 1000", "SFTConfig.overlong = 'truncate'",
    "SFTConfig.sources = {'arithmetic': {'kind': 'arithmetic', 'num_train': 400, 'num_eval': 16, "
    "'difficulties': [0]}}",
]


def _losses(workdir):
  rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
  return [[r["step"], r["loss"], r["grad_norm"]] for r in rows if "grad_norm" in r]


def _check(name, series):
  path = GOLDEN / f"{name}.json"
  if RECORD:
    path.write_text(json.dumps(series))
    pytest.skip(f"recorded {path}")
  golden = json.loads(path.read_text())
  assert [s[0] for s in series] == [g[0] for g in golden]
  # Exact: same config, same data, same arithmetic.
  assert series == golden, next((s, g) for s, g in zip(series, golden) if s != g)


@pytest.fixture(scope="module")
def pretrain_dir(tmp_path_factory):
  from nanbeige_jax.train.pretrain import PretrainConfig, run_pretrain
  workdir = tmp_path_factory.mktemp("golden") / "pretrain"
  gin.clear_config()
  parse_gin(["pretrain/tiny.gin"], PRETRAIN_BINDINGS)
  cfg = build(PretrainConfig)
  gin.clear_config()
  run_pretrain(cfg, workdir)
  return workdir


def test_pretrain_golden_losses(pretrain_dir):
  series = _losses(pretrain_dir)
  assert len(series) == 30
  _check("pretrain_tiny_losses", series)


def test_sft_golden_losses(pretrain_dir, tmp_path):
  from nanbeige_jax.train.sft import SFTConfig, run_sft
  gin.clear_config()
  parse_gin(["sft/tiny_arithmetic.gin"], SFT_BINDINGS + [f"SFTConfig.init_from = {str(pretrain_dir)!r}"])
  cfg = build(SFTConfig)
  gin.clear_config()
  run_sft(cfg, tmp_path / "sft")
  series = _losses(tmp_path / "sft")
  assert len(series) == 30
  _check("sft_tiny_losses", series)
