"""The run side: the command line, run folders, checkpoints, metrics, progress and plots."""
