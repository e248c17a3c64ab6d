"""Test-session setup: 8 fake CPU devices (set before jax is imported) and parsed absl flags (grain reads them)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import gin  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_gin_config():
  """Gin bindings are process-global: every test starts and ends with an empty configuration."""
  gin.clear_config()
  yield
  gin.clear_config()
