"""Every shipped gin file passes the validation its launcher runs before a run starts (issue 12, defect 1), and the
pre-training dry run plans and AOT-compiles a run without data or accelerators.

A config a user can pass must start: ``stage.validate_config`` is the launcher's own pre-flight (the schedule plan
against the model's positions and the per-phase batch, the mesh and every phase's batch split, the attention
memory of every phase's rows on the run's platform) minus what needs the data, the workdir or an init checkpoint.
Pod configs are checked for their platform (TPU) on this CPU host, with the 8 fake devices of the test session.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import pytest

import nanbeige_jax.data.prepare  # noqa: F401  (registers PrepareConfig for configs/data/)
from nanbeige_jax.config import CONFIG_DIR, ConfigError, build, parse_gin
from nanbeige_jax.model import get_preset
from nanbeige_jax.sharding import ShardingConfig
from nanbeige_jax.train import stage
from nanbeige_jax.train.pretrain import PretrainConfig, PretrainStage
from nanbeige_jax.train.sft import SFTConfig, SFTStage

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHIPPED = sorted(str(p.relative_to(CONFIG_DIR)) for p in pathlib.Path(CONFIG_DIR).rglob("*.gin"))
# Schedule files are included by a pretrain file; each is checked inside the run that uses it.
SCHEDULE_HOSTS = {"schedules/fgwsd_paper.gin": ["pretrain/nanbeige4_3b.gin"],
                  "schedules/fgwsd_tiny.gin": ["pretrain/tiny.gin"],
                  "schedules/wsd.gin": ["pretrain/tiny.gin", "schedules/wsd.gin"]}
POD_PRESET = "nanbeige4_3b"


def _platform(model_cfg) -> str | None:
  """The platform a config's run compiles for: TPU for the paper-scale model, this host otherwise."""
  return "tpu" if model_cfg.num_params() > 1e9 else None


def validate_pretrain(files: list[str]) -> stage.StageRun:
  parse_gin(files)
  cfg = build(PretrainConfig)
  model_cfg = cfg.model_config()
  return stage.validate_config(cfg, PretrainStage(), model_cfg, platform=_platform(model_cfg))


def validate_sft(files: list[str]) -> stage.StageRun:
  parse_gin(files)
  cfg = build(SFTConfig)
  # The model an SFT stage trains comes from its init checkpoint: the pod stages start from the 3B model, the tiny
  # stage from the tiny pre-training run.
  preset = "tiny" if "tiny" in files[0] else POD_PRESET
  model_cfg = get_preset(preset, **cfg.model_overrides)
  return stage.validate_config(cfg, SFTStage(), model_cfg, platform=_platform(model_cfg))


def test_every_shipped_config_is_covered():
  assert {"pretrain/nanbeige4_3b.gin", "pretrain/tiny.gin", "sft/cold_start.gin", "sft/overall.gin",
          "sft/tiny_arithmetic.gin", "sharding/fsdp.gin", "data/prepare_example.gin"} <= set(SHIPPED)
  assert set(SCHEDULE_HOSTS) == {p for p in SHIPPED if p.startswith("schedules/")}


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_config_passes_the_launchers_validation(path):
  kind = path.split("/")[0]
  if kind == "pretrain":
    run = validate_pretrain([path])
    assert run.total_steps > 0 and all(entry.seq_len <= run.model_cfg.max_position_embeddings for entry in run.plan)
  elif kind == "schedules":
    run = validate_pretrain(SCHEDULE_HOSTS[path])
    assert run.total_steps > 0
  elif kind == "sft":
    run = validate_sft([path])
    assert run.total_steps > 0
  elif kind == "sharding":
    parse_gin([path])
    sharding = build(ShardingConfig)
    mesh = sharding.make_mesh(devices=jax.devices())
    assert mesh.size == len(jax.devices())
  elif kind == "data":
    from nanbeige_jax.data.prepare import PrepareConfig
    parse_gin([path])
    build(PrepareConfig)
  else:
    pytest.fail(f"no validation for shipped config {path}")


def test_paper_run_long_context_phase_keeps_tokens_per_step():
  run = validate_pretrain(["pretrain/nanbeige4_3b.gin"])
  by_name = {entry.phase.name: entry for entry in run.plan}
  long = by_name["long_context"]
  assert (long.rows, long.seq_len) == (64, 65536) and long.phase.rope_theta == 5e6
  assert by_name["high_quality"].tokens_per_step == long.tokens_per_step == 4 * 2**20


def test_validation_refuses_what_the_launcher_would():
  parse_gin(["pretrain/nanbeige4_3b.gin"])
  cfg = build(PretrainConfig)
  # Without the 64K override the long-context phase cannot start (the defect this test pins).
  with pytest.raises(ConfigError, match="seq_len 65536 exceeds the model's max_position_embeddings 32768"):
    stage.validate_config(cfg, PretrainStage(), get_preset(POD_PRESET), platform="tpu")
  # The plain XLA attention at 64K would materialise (T, T) scores far beyond any chip.
  model = cfg.model_config().replace(attention_impl="xla")
  with pytest.raises(ConfigError, match="attention scores"):
    stage.validate_config(cfg, PretrainStage(), model, platform="tpu")
  parse_gin(["pretrain/tiny.gin"], ["PretrainConfig.global_batch_size = 12"])
  with pytest.raises(ConfigError, match="cannot be split over the 8 batch shards"):
    stage.validate_config(build(PretrainConfig), PretrainStage(), get_preset("tiny"))
  parse_gin(["pretrain/tiny.gin"], [
      "FGWSDSchedule.stable_phases = [{'name': 'diverse', 'tokens': 294912, 'global_batch_size': 20, 'mixture': "
      "{'shakespeare': 0.5, 'python_stdlib': 0.3, 'arithmetic': 0.2}}, {'name': 'high_quality', 'tokens': 163840, "
      "'mixture': {'shakespeare': 0.2, 'python_stdlib': 0.4, 'arithmetic': 0.4}}]"])
  with pytest.raises(ConfigError, match="not a multiple of PretrainConfig.global_batch_size"):
    stage.validate_config(build(PretrainConfig), PretrainStage(), get_preset("tiny"))


def test_dry_run_through_the_launcher_compiles_each_shape_for_a_tpu_topology(tmp_path):
  """A tiny run with a long-row phase of its own: the table lists every phase and each distinct (rows, seq_len) is
  compiled for v5e-4 on this host (libtpu), nothing is written, exit status 0."""
  schedule = ("FGWSDSchedule.decay_phases = [{'name': 'decay_hq', 'tokens': 32768, 'mixture': {'shakespeare': 0.2, "
              "'python_stdlib': 0.4, 'arithmetic': 0.4}}, {'name': 'long', 'tokens': 131072, 'seq_len': 512, "
              "'global_batch_size': 8, 'rope_theta': 1e7, 'mixture': {'shakespeare': 0.1, 'python_stdlib': 0.45, "
              "'arithmetic': 0.45}}]")
  cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--dry_run", "--topology", "v5e-4",
         "--workdir", str(tmp_path / "never"), "--gin_param", "PretrainConfig.global_batch_size = 8",
         "--gin_param", "FGWSDSchedule.stable_phases = [{'name': 'diverse', 'tokens': 294912, 'global_batch_size': "
         "16, 'mixture': {'shakespeare': 0.5, 'python_stdlib': 0.3, 'arithmetic': 0.2}}, {'name': 'high_quality', "
         "'tokens': 163840, 'mixture': {'shakespeare': 0.2, 'python_stdlib': 0.4, 'arithmetic': 0.4}}]",
         "--gin_param", schedule, "--gin_param", "PretrainConfig.model_overrides = {'max_position_embeddings': 512}"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  out = proc.stdout
  for phase in ("warmup", "diverse", "high_quality", "decay_hq", "long"):
    assert f"| {phase} |" in out
  assert "| 16 x 256 |" in out and "| 8 x 512 |" in out and "on v5e-4" in out
  assert out.count("FITS (") == 2
  assert not (tmp_path / "never").exists()
