"""Training: state, data, step (built once, shared by the trainer and the AOT planner), loop, optim, metrics,
checkpoints (Orbax + preemption) and params export."""
