"""Optimization: the FG-WSD token-keyed schedule and the AdamW optimizer builder (gin module nanbeige_jax.optim)."""
from nanbeige_jax.optim.optimizer import (OptimizerConfig, decay_mask_fn, get_learning_rate, make_optimizer,
                                          param_path_names, set_learning_rate)
from nanbeige_jax.optim.schedules import (DECAY_SHAPES, PAPER_DECAY_TOKENS, PAPER_DIVERSITY_STABLE_TOKENS,
                                          PAPER_FINAL_LR, PAPER_HIGH_QUALITY_STABLE_TOKENS, PAPER_PEAK_LR,
                                          PAPER_TOTAL_TOKENS, PAPER_WARMUP_TOKENS, Boundary, FGWSDSchedule, Phase,
                                          PhasePlan, SplitTokens, plan_steps, total_steps, wsd_schedule)

__all__ = [
    "OptimizerConfig", "decay_mask_fn", "get_learning_rate", "make_optimizer", "param_path_names",
    "set_learning_rate", "DECAY_SHAPES", "PAPER_DECAY_TOKENS", "PAPER_DIVERSITY_STABLE_TOKENS", "PAPER_FINAL_LR",
    "PAPER_HIGH_QUALITY_STABLE_TOKENS", "PAPER_PEAK_LR", "PAPER_TOTAL_TOKENS", "PAPER_WARMUP_TOKENS", "Boundary",
    "FGWSDSchedule", "Phase", "PhasePlan", "SplitTokens", "plan_steps", "total_steps", "wsd_schedule",
]
