"""Training loop, evaluation, optimizers and schedules."""
