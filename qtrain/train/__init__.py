"""Training: the loop, schedules, atomic checkpoints, configuration, distributed set-up."""
