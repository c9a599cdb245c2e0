"""Stages, the runner, sharding, checkpoints, sampling and evaluation."""
