"""Evaluation: reward-model metrics and reports (`reward_accuracy`, `plots`) and checkpoint sweeps (`sweep`)."""
