"""Generation engine: sampling settings, the jitted KV-cache sampler, and checkpoint loading for generation."""
from nanbeige_jax.generate.loading import check_tokenizer_matches, load_model
from nanbeige_jax.generate.sampler import FINISH_EOS, FINISH_LENGTH, GenerationResult, Sampler, left_pad
from nanbeige_jax.generate.sampling import (SamplingConfig, choose_tokens, policy_logprobs, resolve_stop_tokens,
                                            truncate_logits)

__all__ = ["check_tokenizer_matches", "load_model", "FINISH_EOS", "FINISH_LENGTH", "GenerationResult", "Sampler", "left_pad", "SamplingConfig",
           "choose_tokens", "policy_logprobs", "resolve_stop_tokens", "truncate_logits"]
