"""Which accelerator platforms JAX should try, decided before JAX starts (imported by ``nanbeige_jax`` itself).

With the ``tpu`` extra installed (libtpu), JAX tries to start the TPU runtime on every machine; on a machine without
a TPU, libtpu prints initialisation errors to stderr (``Failed to find host bounds``, ``unexpected worker
hostname``, ``No jellyfish device found``) before JAX falls back to the CPU. ``skip_absent_tpu`` prevents that: when
libtpu is installed, no TPU device is present, no GPU plugin is installed and the user has not chosen platforms
(``JAX_PLATFORMS`` unset), it sets ``JAX_PLATFORMS=cpu``. A machine with a TPU, a GPU plugin, or an explicit
``JAX_PLATFORMS`` is left alone. This module imports nothing from JAX at import time.

``quiet_library_logs`` makes WARNING the default of absl's ``--verbosity``: orbax, jax and grain log through absl
at INFO (dozens of lines per checkpoint save), which a user running a launcher should not have to read; the run's
own messages and every library warning still reach the terminal, and ``--verbosity=0`` brings the INFO lines back.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from typing import Mapping

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def tpu_present(env: Mapping[str, str] | None = None) -> bool:
  """A Cloud TPU VM: TPU environment variables or TPU device nodes (``/dev/accel*``, ``/dev/vfio/*``)."""
  env = os.environ if env is None else env
  if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_ACCELERATOR_TYPE"):
    return True
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def skip_absent_tpu(env: dict | None = None) -> str | None:
  """Set ``JAX_PLATFORMS=cpu`` in ``env`` (default ``os.environ``) when libtpu would be started for nothing (see
  the module docstring); returns the value set, or None when nothing was changed."""
  env = os.environ if env is None else env
  if "JAX_PLATFORMS" in env or tpu_present(env):
    return None
  if not (_installed("libtpu") or env.get("TPU_LIBRARY_PATH")) or any(_installed(p) for p in _GPU_PLUGINS):
    return None
  env["JAX_PLATFORMS"] = "cpu"
  if env is os.environ and "jax" in sys.modules:  # JAX read the variable already: tell its config (no effect
    import jax                                     # once a backend has started)
    if jax.config.jax_platforms is None:
      jax.config.update("jax_platforms", "cpu")
  return "cpu"


def quiet_library_logs() -> None:
  """absl's ``--verbosity`` defaults to WARNING (-1) unless the command line sets it (see the module docstring)."""
  from absl import flags
  from absl import logging as absl_logging  # noqa: F401  (defines --verbosity)
  verbosity = flags.FLAGS["verbosity"]
  if verbosity.present:
    return
  verbosity.value = -1  # absl's verbosity flag applies a new value to the logging levels
  # app.run raises a verbosity that still "uses its default" to INFO right after parsing; this one does not.
  verbosity.using_default_value = False
