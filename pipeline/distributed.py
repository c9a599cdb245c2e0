"""Multi-process start-up: one process per host, all running the same program."""

from __future__ import annotations

import os

import jax
from absl import logging

# Environment variables that mean "this is one process of several".
_MULTIPROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS')


def initialize() -> None:
  """Calls jax.distributed.initialize() when launched as several processes.

  Cloud TPU slices and SLURM are detected by jax itself; elsewhere set
  JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if not any(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    return
  jax.distributed.initialize(
      coordinator_address=os.environ.get('JAX_COORDINATOR_ADDRESS'),
      num_processes=int(os.environ['JAX_NUM_PROCESSES']) if 'JAX_NUM_PROCESSES' in os.environ else None,
      process_id=int(os.environ['JAX_PROCESS_ID']) if 'JAX_PROCESS_ID' in os.environ else None,
      initialization_timeout=int(os.environ.get('JAX_INIT_TIMEOUT_S', '300')))
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
