"""A training run's life around the step loop: its directory and files, checkpoints, the lock that
keeps one writer per directory, signals, the process group, and the hardware settings it runs
with."""
