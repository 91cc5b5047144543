"""Mixture search: sampled schedules fanned out on Ray, regression fits, the winning schedule."""
