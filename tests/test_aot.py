"""Ahead-of-time compilation of the real train step for a TPU topology on this CPU host (needs libtpu: the
``tpu`` extra). A tiny config on a 4-chip v5e slice: memory report, analytic FLOPs, splash attention, and the
launcher's non-zero exit with the overshoot when the step does not fit."""
import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]'); AOT TPU compilation "
                                       "needs it")

from nanbeige_jax import aot  # noqa: E402
from nanbeige_jax.model import get_preset  # noqa: E402
from nanbeige_jax.sharding import ShardingConfig  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_preset("test", dtype="bfloat16", remat_policy="full", attention_impl="splash", head_dim=32)


@pytest.fixture(scope="module")
def devices():
  return aot.topology_devices(aot.get_topology("v5e-4"))


def test_topology_devices_are_tpu_chips(devices):
  assert len(devices) == 4 and devices[0].platform == "tpu" and "v5" in devices[0].device_kind


def test_compile_tiny_train_step_with_splash(devices):
  result = aot.compile_for_topology(CFG, "v5e-4", global_batch=8, seq_len=256,
                                    sharding=ShardingConfig(data=1, fsdp=2, tensor=2, rules="fsdp_tp"),
                                    devices=devices)
  m = result.memory
  assert m.arguments > 0 and m.temporaries > 0 and m.outputs > 0
  # The old state is donated: nearly all of the output (new params + optimizer state) aliases the arguments.
  assert m.aliased >= 0.9 * m.outputs
  assert m.fits and m.hbm == 16 * aot.GiB
  assert result.flops_per_step == CFG.flops_per_token(256) * 8 * 256
  text = aot.format_result(result, CFG)
  assert "FITS" in text and "attention=splash" in text and "per device" in text


def test_rejects_batch_that_does_not_split(devices):
  with pytest.raises(ValueError, match="cannot be split over the 4 batch shards"):
    aot.compile_for_topology(CFG, "v5e-4", global_batch=6, seq_len=128, sharding=ShardingConfig(rules="fsdp"),
                             devices=devices)


def test_launcher_exits_nonzero_when_over_hbm():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "aot_compile.py"), "--preset", "test",
                        "--topology", "v5e-4", "--global_batch", "8", "--seq_len", "128", "--remat", "full",
                        "--hbm_gib", "0.001"], capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 1, out.stdout + out.stderr[-3000:]
  assert "DOES NOT FIT: needs" in out.stdout and "over the 1.02 MiB of HBM" in out.stdout
  assert "model FLOPs/step" in out.stdout


def test_compiler_out_of_memory_is_a_does_not_fit_answer(devices, monkeypatch):
  """Far over HBM the TPU compiler stops before any memory analysis exists (seen at batch 320 on v5p-8): the
  result is "does not fit" with the compiler's words, so --find_max_batch keeps bisecting instead of crashing."""
  import jax
  from nanbeige_jax.train.step import Trainer
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
             "(101.43G) exceeds available HBM (95.74G).")

  class Refusing:
    def compile(self):
      raise jax.errors.JaxRuntimeError(message)

  monkeypatch.setattr(Trainer, "lower_train_step", lambda self, shapes: Refusing())
  result = aot.compile_for_topology(CFG, "v5e-4", global_batch=8, seq_len=128, devices=devices)
  assert not result.memory.fits and "101.43G" in result.memory.refused
  text = aot.format_result(result, CFG)
  assert "DOES NOT FIT: the TPU compiler ran out of the 16.00 GiB of HBM per device" in text and "95.74G" in text

  class Broken:
    def compile(self):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(Trainer, "lower_train_step", lambda self, shapes: Broken())
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    aot.compile_for_topology(CFG, "v5e-4", global_batch=8, seq_len=128, devices=devices)
