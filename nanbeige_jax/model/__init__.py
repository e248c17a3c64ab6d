from nanbeige_jax.model.config import PRESETS, ModelConfig, get_preset
from nanbeige_jax.model.decoder import Decoder, KVCache, abstract_model, count_params, decoder_from_params

__all__ = ["PRESETS", "ModelConfig", "get_preset", "Decoder", "KVCache", "abstract_model", "count_params",
           "decoder_from_params"]
