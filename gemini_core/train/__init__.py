"""Training: the jitted step functions, the optimizer, the trainer loop, distillation, progress lines."""
