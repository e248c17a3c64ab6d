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

from nanbeige_jax import config, distributed

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
