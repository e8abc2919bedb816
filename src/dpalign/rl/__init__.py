"""Reward models and reinforcement learning under DP: a Bradley-Terry reward model trained
with DP-SGD (``reward``), and RLOO / GRPO against it with the prompt as privacy unit
(``advantages``, ``rollout``, ``step``, ``privacy``)."""
