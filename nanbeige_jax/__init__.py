"""nanbeige-jax: the Nanbeige4-3B training system in JAX/Flax."""
__version__ = "0.1.0"
