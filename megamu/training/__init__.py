"""Training: DeepSpeed engine, LR schedules, loop, checkpoints, guards and metrics.

Import the submodules directly (e.g. `megamu.training.loop.train`); this package stays light so
that importing a schedule does not import DeepSpeed.
"""
