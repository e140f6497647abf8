"""Offline toy demo: the DPO paper's controlled-sentiment experiment on a laptop CPU."""
