"""Trainers: SFT, reward model, DPO family and PPO, all on `jaxalign.trainers.engine`."""
