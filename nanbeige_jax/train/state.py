"""The train state shared by every trainer: params + optimizer state + counters, one pytree."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer updates applied (skipped non-finite steps included)
  params: Any                # pure nested dict (see nanbeige_jax.model)
  opt_state: Any             # optax state for params
  skipped_steps: jax.Array   # int32: non-finite steps whose update was skipped
  bad_streak: jax.Array      # int32: consecutive non-finite steps (reset by a finite one)
