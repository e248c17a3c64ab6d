"""nanbeige-jax: the Nanbeige4-3B training system in JAX/Flax."""
from nanbeige_jax import platform as _platform

__version__ = "0.1.0"

_platform.skip_absent_tpu()  # before JAX starts: no libtpu start-up errors on machines without a TPU
_platform.quiet_library_logs()  # orbax/jax INFO lines off the terminal (``--verbosity=0`` restores them)
