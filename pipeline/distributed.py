"""Multi-process start-up: one process per host (or per GPU), all running the
same program; `jax.distributed` connects them and the mesh spans all devices.

Three ways in, first match wins:
  explicit   --coordinator_address=host:port --num_processes=N --process_id=i
             (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
  cluster    --distributed=on: jax detects the cluster itself (Cloud TPU,
             SLURM, Open MPI, ...); 'auto' does this on a Cloud TPU VM
  none       a single process (the default anywhere else)

A peer that never starts would otherwise abort the process from inside XLA's
coordination client with DEADLINE_EXCEEDED; with explicit addresses the
processes first meet on the coordinator's port (`_rendezvous`), so a missing
peer is a Python error that names it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import socket
import time

import jax
from absl import logging

MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the run (see the module docstring)."""
  mode: str = 'auto'  # 'auto' | 'on' | 'off'
  coordinator_address: str | None = None  # host:port of process 0
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300  # how long processes wait for each other at start-up

  @classmethod
  def from_env(cls, mode: str = 'auto', coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 300) -> 'Launch':
    """Flags win over the JAX_* environment variables."""
    env = os.environ.get
    def as_int(name, value):
      if value is not None or not env(name):
        return value
      try:
        return int(env(name))
      except ValueError:
        raise ValueError(f'{name}={env(name)!r} is not an integer') from None
    return cls(mode, coordinator_address or env('JAX_COORDINATOR_ADDRESS') or None,
               as_int('JAX_NUM_PROCESSES', num_processes),
               as_int('JAX_PROCESS_ID', process_id), timeout_s)

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _check(launch: Launch) -> None:
  if launch.mode not in MODES:
    raise ValueError(f'--distributed={launch.mode!r}: expected one of {MODES}')
  if launch.timeout_s <= 0:
    raise ValueError(f'--distributed_timeout_s={launch.timeout_s} must be > 0')
  if not launch.explicit:
    return
  if launch.mode == 'off':
    raise ValueError(f'--distributed=off but a coordinator address is set '
                     f'({launch.coordinator_address}); unset JAX_COORDINATOR_ADDRESS')
  host, _, port = launch.coordinator_address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'coordinator address {launch.coordinator_address!r} must be host:port')
  if launch.num_processes is None or launch.process_id is None:
    raise ValueError('a coordinator address needs --num_processes and --process_id too '
                     '(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)')
  if launch.num_processes < 1 or not 0 <= launch.process_id < launch.num_processes:
    raise ValueError(f'process_id={launch.process_id} must be in [0, num_processes='
                     f'{launch.num_processes})')


def _on_cloud_tpu() -> bool:
  """A TPU VM: libtpu installed and TPU chips visible (accel or vfio devices)."""
  return (importlib.util.find_spec('libtpu') is not None and
          bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')))


def _rendezvous(launch: Launch) -> None:
  """All processes meet on the coordinator's port before jax.distributed binds it.

  Process 0 listens and waits for the other N-1 ids; each other process
  connects (retrying while process 0 starts) and waits for the go. Raises
  TimeoutError naming the missing processes after launch.timeout_s.
  """
  host, _, port = launch.coordinator_address.rpartition(':')
  deadline = time.monotonic() + launch.timeout_s
  if launch.process_id == 0:
    with socket.create_server(('', int(port)), reuse_port=False) as server:
      peers = {}
      while len(peers) < launch.num_processes - 1:
        server.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
          conn, _ = server.accept()
        except socket.timeout:
          missing = sorted(set(range(1, launch.num_processes)) - set(peers))
          for conn in peers.values():
            conn.close()
          raise TimeoutError(
              f'process 0: processes {missing} of {launch.num_processes} did not connect to '
              f'{launch.coordinator_address} within {launch.timeout_s} s; start every process '
              'with the same coordinator address and number of processes') from None
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
          peers[int(conn.recv(16).decode())] = conn
        except (OSError, ValueError):  # a peer that connected and died: it may retry
          conn.close()
      for conn in peers.values():
        conn.sendall(b'go')
        conn.close()
    return
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1.0) as conn:
        conn.sendall(str(launch.process_id).encode())
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        if conn.recv(2) == b'go':
          return
    except OSError:
      pass  # process 0 not listening yet, or it gave up: retry until the deadline
    if time.monotonic() > deadline:
      raise TimeoutError(
          f'process {launch.process_id}: the coordinator (process 0) at '
          f'{launch.coordinator_address} did not gather all {launch.num_processes} processes '
          f'within {launch.timeout_s} s; is process 0 running, and every other one?')
    time.sleep(0.2)


def initialize(launch: Launch) -> None:
  """Calls jax.distributed.initialize() when this is one process of several.

  Must run before any other JAX call.
  """
  _check(launch)
  if launch.explicit:
    if launch.num_processes > 1:
      _rendezvous(launch)
    jax.distributed.initialize(launch.coordinator_address, launch.num_processes,
                               launch.process_id, initialization_timeout=launch.timeout_s)
  elif launch.mode == 'on' or (launch.mode == 'auto' and _on_cloud_tpu()):
    jax.distributed.initialize(initialization_timeout=launch.timeout_s)  # cluster auto-detection
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
