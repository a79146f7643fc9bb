"""rlhf: supervised fine-tuning, reward modelling and PPO, readable and on accelerate."""

__version__ = "0.1.0"
