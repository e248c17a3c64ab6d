"""Run several test processes together (a multi-process jax.distributed run on localhost) and check they all
succeeded; shared by the 2-process tests."""
from __future__ import annotations

import socket
import subprocess
from typing import Mapping, Sequence


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(commands: Sequence[Sequence[str]], *, env: Mapping[str, str], timeout: float, cwd: str | None = None,
                 tail: int = 4000) -> list[str]:
  """Start every command at once, wait for all (killing any left after ``timeout`` s each), assert each exited 0
  (the message holds the last ``tail`` characters of its output) and return their combined stdout/stderr."""
  procs = [subprocess.Popen(list(cmd), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for cmd in commands]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, text) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{text[-tail:]}"
  return outputs
