"""jaxalign: align language models with human preferences in JAX/Flax (SFT, reward models, PPO, DPO)."""

__version__ = "0.1.0"
