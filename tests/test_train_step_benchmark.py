"""benchmarks/train_step.py end to end on the CPU (the ``test`` preset): it prints step time, tokens/s, model
FLOPs/token, compiled memory, MFU against the measured matmul peak, the transformers step and the speed ratio;
and the glibc malloc settings it restarts under."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

from nanbeige_jax import host_malloc

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_benchmark(*args: str, timeout: int = 600) -> str:
  env = {k: v for k, v in os.environ.items() if k not in host_malloc.SETTINGS}
  env["XLA_FLAGS"] = ""  # one CPU device, as a user's run
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_step.py"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_train_step_benchmark_prints_every_figure():
  out = run_benchmark("--preset", "test", "--batch", "4", "--seq_len", "16", "--steps", "2",
                      "--set", "scan_layers=false", "--vocab_chunk", "256")
  config = re.search(r"^config: preset=test .* batch 4 x seq 16 = 64 tokens, .*scan_layers=False", out, re.M)
  assert config, out
  if host_malloc.applies():
    assert "malloc=host_malloc.SETTINGS" in out  # it restarted itself under the settings
  jax_line = re.search(r"^jax: +step +([\d.]+) ms +(\d+) tok/s +model FLOPs/token ([\d.e+]+) +achieved ([\d.]+) GFLOP/s",
                       out, re.M)
  assert jax_line, out
  step_ms, tok_s, flops_tok = float(jax_line[1]), float(jax_line[2]), float(jax_line[3])
  assert step_ms > 0 and tok_s > 0
  from nanbeige_jax.model import get_preset
  assert flops_tok == pytest.approx(get_preset("test").flops_per_token(16), rel=1e-3)
  assert re.search(r"^compiled memory: arguments .+, outputs .+ aliased\), temporaries ", out, re.M), out
  mfu = re.search(r"^MFU: ([\d.]+)% of ([\d.]+) GFLOP/s \(best of 2 fp32 2048\^3 matmul", out, re.M)
  assert mfu and float(mfu[1]) > 0 and float(mfu[2]) > 1, out
  torch_line = re.search(r"^torch: +step +([\d.]+) ms +(\d+) tok/s .*MFU ([\d.]+)%", out, re.M)
  assert torch_line and float(torch_line[1]) > 0, out
  ratio = re.search(r"^speed ratio jax/torch: ([\d.]+)x \(per round: ([\d. ]+)\)", out, re.M)
  assert ratio and float(ratio[1]) > 0 and len(ratio[2].split()) == 2, out


def test_malloc_settings_reexec_is_a_no_op_once_active(monkeypatch):
  """Under the settings (or off glibc) it returns instead of restarting; the settings are the documented ones."""
  for key, value in host_malloc.SETTINGS.items():
    monkeypatch.setenv(key, value)
  assert host_malloc.active()
  monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("restarted although the settings are active"))
  host_malloc.reexec_with_malloc_settings(["x.py"])
  assert host_malloc.SETTINGS["MALLOC_MMAP_MAX_"] == "0" and host_malloc.SETTINGS["MALLOC_ARENA_MAX"] == "1"


def test_malloc_settings_reexec_restarts_with_them(monkeypatch):
  if not host_malloc.applies():
    pytest.skip("not glibc")
  for key in host_malloc.SETTINGS:
    monkeypatch.delenv(key, raising=False)
  calls = []
  monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
  host_malloc.reexec_with_malloc_settings(["prog.py", "--flag"])
  (exe, argv, env), = calls
  assert exe == sys.executable and argv == [sys.executable, "prog.py", "--flag"]
  assert all(env[k] == v for k, v in host_malloc.SETTINGS.items())
