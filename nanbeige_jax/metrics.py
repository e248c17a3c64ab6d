"""Run metrics: JSONL + TensorBoard writers (local or any path-layer scheme), a progress bar with ETA, throughput and
MFU.

MFU follows the MaxText definition: model FLOPs per token (6N over matmul parameters plus causal attention counted
half, ``ModelConfig.flops_per_token``) times tokens/s, over the devices' peak FLOP/s.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

from nanbeige_jax import paths

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}


def measure_cpu_peak_flops(n: int = 2048, dtype=np.float32, repeats: int = 3) -> float:
  """This machine's achievable matmul FLOP/s (best of a few large jitted matmuls)."""
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def device_peak_flops(device=None) -> float | None:
  """Peak FLOP/s of one device from the table (None for unknown kinds, e.g. CPUs: measure those)."""
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "")
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(name):
      return PEAK_FLOPS[name]
  return None


class MetricsWriter:
  """Writes scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard (``<workdir>/tb``) from process 0.

  ``workdir`` may be any path-layer scheme (``gs://...``). On local disk both are written in place (the JSONL line
  by line). Elsewhere both are staged in a local directory and uploaded by ``sync()``: every ``sync_every_s``
  seconds from ``write``, and at ``close``. tensorboardX writes only local files and S3 itself, so staging is the
  one behaviour for every scheme; an existing remote ``metrics.jsonl`` (a resumed run) is downloaded first so that
  the run appends to it. Each upload replaces whole objects (atomic per object).
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None, *, sync_every_s: float = 60.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = os.fspath(workdir)
    self.path = paths.join(self.workdir, METRICS_FILE)
    self.sync_every_s = sync_every_s
    self._tb = None
    self._file = None
    self._staging: str | None = None
    self._last_sync = time.monotonic()
    if not self.enabled:
      return
    paths.mkdir(self.workdir)
    local_dir = self.workdir
    if not paths.is_local(self.workdir):
      local_dir = self._staging = tempfile.mkdtemp(prefix="nanbeige_metrics_")
      if paths.exists(self.path):
        paths.copy(self.path, os.path.join(local_dir, METRICS_FILE))
    self._file = open(os.path.join(local_dir, METRICS_FILE), "a", buffering=1, encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(local_dir, TB_DIR))
    except ImportError:  # pragma: no cover - tensorboardX is a core dependency
      self._tb = None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: _to_python(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, int(step))
    if self._staging is not None and time.monotonic() - self._last_sync >= self.sync_every_s:
      self.sync()

  def sync(self) -> None:
    """Flushes, and for a non-local workdir uploads the staged JSONL and TensorBoard event files."""
    if not self.enabled:
      return
    if self._file:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    self._last_sync = time.monotonic()
    if self._staging is None:
      return
    paths.copy(os.path.join(self._staging, METRICS_FILE), self.path)
    for root, _, files in os.walk(self._staging):
      for name in files:
        local = os.path.join(root, name)
        relative = os.path.relpath(local, self._staging)
        if relative != METRICS_FILE:
          paths.copy(local, paths.join(self.workdir, *relative.split(os.sep)))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._file:
      self._file.close()
    if self._staging is not None and (self._file or self._tb is not None):
      self._file = self._tb = None
      self.sync()
      shutil.rmtree(self._staging, ignore_errors=True)
      self._staging = None
    self._file = None
    self._tb = None


def _to_python(v: Any) -> Any:
  if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0:
    v = np.asarray(v).item()
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of a metrics JSONL file (any path-layer scheme)."""
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """A one-line progress bar with ETA (rewritten in place on a terminal, one line per update otherwise)."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=None, width: int = 24):
    self.total, self.start = total_steps, start_step
    self.stream = stream or sys.stderr
    self.width = width
    self.t0 = time.perf_counter()
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def update(self, step: int, text: str) -> str:
    done = max(step - self.start, 0)
    elapsed = time.perf_counter() - self.t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else math.inf
    frac = min(step / max(self.total, 1), 1.0)
    filled = int(frac * self.width)
    bar = "#" * filled + "." * (self.width - filled)
    line = f"[{bar}] {step}/{self.total} {frac:5.1%} | {text} | ETA {format_duration(eta)}"
    if jax.process_index() == 0:
      self.stream.write(("\r" + line) if self.tty else (line + "\n"))
      self.stream.flush()
    return line

  def close(self) -> None:
    if self.tty and jax.process_index() == 0:
      self.stream.write("\n")
