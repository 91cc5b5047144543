"""Runs: the run directory contract, checkpoints, the metrics file (metrics), W&B (wandb_run,
wandb_offline) and the Tracker that writes both (tracking)."""
