"""Every launcher's ``--help`` lists the flags it takes (issue 11 item 7: the shared flags are defined in
``nanbeige_jax.config`` / ``nanbeige_jax.distributed`` and absl's ``--help`` shows only the main module's flags)."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags

from nanbeige_jax import config, distributed, hf_export

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCHERS = sorted(p.name for p in (REPO / "launch").glob("*.py"))
_DEFINE = re.compile(r"flags\.DEFINE_\w+\(\s*f?\"([^\"]+)\"")


def _helper_flags(source: str) -> set[str]:
  """Flags the shared helpers a launcher calls define (in a FlagValues of their own)."""
  names: set[str] = set()
  helpers = {"define_gin_flags": lambda fv: config.define_gin_flags([], "X.y=1", flag_values=fv),
             "define_run_flags": lambda fv: config.define_run_flags("w", "help", flag_values=fv),
             "define_distributed_flags": lambda fv: distributed.define_distributed_flags(flag_values=fv)}
  for name, define in helpers.items():
    if f"{name}(" in source:
      fv = flags.FlagValues()
      define(fv)
      names |= set(fv)
  return names


def _expected_flags(path: pathlib.Path) -> set[str]:
  source = path.read_text()
  names = set(_DEFINE.findall(source)) | _helper_flags(source)
  roles = re.search(r"for _role, _help in \(([^)]*\)[^)]*)\)", source)  # refine_sft_data's per-role flags
  if roles:
    names = {n for n in names if "{" not in n}
    names |= {f"{role}_model" for role in re.findall(r"\(\"(\w+)\",", roles.group(1))}
  return names


def test_help_lists_every_flag():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  procs = {name: subprocess.Popen([sys.executable, str(REPO / "launch" / name), "--help"], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for name in LAUNCHERS}
  missing = {}
  for name, proc in procs.items():
    out = proc.communicate(timeout=300)[0]
    # absl's --help exits with status 1 after printing the help.
    assert proc.returncode in (0, 1) and "Traceback" not in out and "Try --helpfull" in out, f"{name}:\n{out[-2000:]}"
    expected = _expected_flags(REPO / "launch" / name)
    assert expected, name
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", out, flags=re.M))
    if expected - listed:
      missing[name] = sorted(expected - listed)
  assert not missing, f"flags missing from --help: {missing}"
  assert {"gin_file", "gin_param", "workdir", "fresh", "max_steps", "coordinator_address"} <= _expected_flags(
      REPO / "launch" / "pretrain.py")


def test_cpu_machine_output_has_no_libtpu_errors_or_library_info(tmp_path):
  """Issue 11 item 7: with the tpu extra (libtpu) installed, a command on a machine without a TPU printed libtpu's
  initialisation errors, and orbax's INFO lines reached the terminal. Runs the real converter both ways."""
  import numpy as np

  from nanbeige_jax import hf
  from nanbeige_jax.model import get_preset
  cfg = get_preset("test")
  rng = np.random.default_rng(0)
  tree: dict = {}
  for path, shape in hf.native_shapes(cfg).items():
    hf._set_path(tree, path, rng.standard_normal(shape).astype(np.float32))
  hf_export.save_hf_dir(tmp_path / "hf", cfg, tree, dtype="float32")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = str(REPO)
  for direction, src, dst in (("hf_to_native", "hf", "native"), ("native_to_hf", "native", "hf_again")):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "convert_hf.py"), f"--direction={direction}",
                           f"--src={tmp_path / src}", f"--dst={tmp_path / dst}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not re.search(r"TPU|libtpu|jellyfish|InitGoogle", proc.stderr), proc.stderr[-3000:]
    assert not re.search(r"^I\d{4} ", proc.stderr, flags=re.M), proc.stderr[-3000:]  # absl INFO lines
    assert proc.stdout.startswith("imported" if direction == "hf_to_native" else "exported")


def test_skip_absent_tpu_only_when_nothing_else_decides():
  from nanbeige_jax import platform
  if not platform._installed("libtpu") or any(platform._installed(p) for p in platform._GPU_PLUGINS):
    pytest.skip("needs libtpu installed and no GPU plugin (the tpu extra on a CPU machine)")
  if platform.tpu_present({}):
    pytest.skip("this machine has a TPU")
  env: dict = {}
  assert platform.skip_absent_tpu(env) == "cpu" and env == {"JAX_PLATFORMS": "cpu"}
  for chosen in ({"JAX_PLATFORMS": "tpu"}, {"JAX_PLATFORMS": ""}, {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}):
    env = dict(chosen)
    assert platform.skip_absent_tpu(env) is None and env == chosen
