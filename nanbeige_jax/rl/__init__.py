"""Reinforcement-learning building blocks on the stage template: the rollout buffer (more to come with GRPO)."""
