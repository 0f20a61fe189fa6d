"""Training: the loop, schedules, atomic checkpoints (and rebuilding their models), configuration,
distributed set-up."""
