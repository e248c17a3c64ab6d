"""Pre-training data: tokenizer, document sources, packing, the mixture iterator, synthetic tasks.

Modules are imported directly (``from nanbeige_jax.data.mixture import MixtureIterator``); this package imports
nothing itself so that light users (e.g. the tokenizer alone) do not pay for grain/pyarrow.
"""
