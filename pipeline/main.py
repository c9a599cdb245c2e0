"""Command line: parse flags, then hand the config to the stage runner.

  python -m pipeline.main --config=configs/default.py --workdir=runs/demo \
      --config.stages.0.steps=10
  python -m pipeline.main --config=... --workdir=runs/demo --reevaluate=distill  # eval only

Several processes (one per host, or per GPU), each with the same flags plus
its id; see pipeline/distributed.py and the README ("Scaling past one device"):

  python -m pipeline.main --config=... --workdir=shared/run \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0
"""

from __future__ import annotations

import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder of the run.', required=True)
_REEVALUATE = flags.DEFINE_list(
    'reevaluate', [], 'Finished stages to score on the held-out suite again under the '
    "config's eval settings (e.g. eval.samples); trains nothing.")
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    "jax.distributed: 'auto' joins when a coordinator address is given or on a Cloud TPU VM; "
    "'on' also lets jax detect other clusters (SLURM, MPI); 'off' runs one process.")
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (or JAX_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Processes in the run (or JAX_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process, 0..num_processes-1 (or JAX_PROCESS_ID).')
_DIST_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout_s', 300, 'Seconds the processes wait for each other at start-up.')


def index_overrides(argv: list[str]) -> list[str]:
  """`--config.stages.0.steps=10` -> `--config.stages[0].steps=10`: config_flags
  parses override paths as Python expressions, where `stages.0` is not valid."""
  out = []
  for arg in argv:
    if arg.startswith('--config.'):
      key, eq, value = arg.partition('=')
      arg = re.sub(r'\.(\d+)(?=\.|$)', r'[\1]', key) + eq + value
    out.append(arg)
  return out


class _QuietLibraries(py_logging.Filter):
  """Drops orbax's and grain's per-save INFO chatter; keeps their warnings."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or not any(
        lib in record.pathname for lib in ('/orbax/', '/grain/'))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from pipeline import distributed, loop, runner
  distributed.initialize(distributed.Launch.from_env(
      _DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
      _DIST_TIMEOUT.value))
  import jax
  if jax.process_index() != 0:  # process 0 logs; the others only warn
    logging.set_verbosity(logging.WARNING)
  loop.install_sigterm_handler()
  try:
    if _REEVALUATE.value:
      runner.reevaluate(_CONFIG.value, _WORKDIR.value, _REEVALUATE.value)
    else:
      runner.run_pipeline(_CONFIG.value, _WORKDIR.value)
  except loop.Preempted as e:
    logging.warning('%s; re-run the same command to resume', e)


def _with_huge_pages() -> None:
  """Re-executes this process (same PID) with glibc's transparent huge pages.

  XLA:CPU allocates each step's temp buffer afresh; with 4 KiB pages the
  kernel takes ~100k page faults per step (measured: the 5M-param step
  688 -> 472 ms with huge pages, experiments/bench_train_step.py). glibc reads
  the tunable only at start-up, hence the exec. An existing GLIBC_TUNABLES is
  left alone.
  """
  if sys.platform != 'linux' or 'GLIBC_TUNABLES' in os.environ:
    return
  env = {**os.environ, 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  os.execve(sys.executable, [sys.executable, '-m', 'pipeline.main', *sys.argv[1:]], env)


def run() -> None:
  _with_huge_pages()
  sys.argv = index_overrides(sys.argv)
  app.run(main)


if __name__ == '__main__':
  run()
