"""Training objectives, one module per stage, on the loss core of ``nanbeige_jax.losses``.

An ``Objective`` returns ``{term: (sum, weight)}`` per micro-batch: ``sum`` is summed (never averaged) over the
micro-batch and ``weight`` is what that term is divided by (tokens for a token-level term, pairs or sequences for a
sequence-level one). The train step (``nanbeige_jax.train.step``) divides every term by its own *global* weight
(all micro-batches, all devices) and minimises ``sum_t coefficient_t * sum_t / weight_t``.
"""
from nanbeige_jax.objectives.base import Objective, Terms  # noqa: F401
from nanbeige_jax.objectives.lm import make_lm_loss  # noqa: F401
