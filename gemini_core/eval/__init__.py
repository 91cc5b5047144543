"""Evaluation: per-domain held-out loss and bits per byte, and evaluation of a finished run."""
