"""Multi-process runs: 2 processes x 2 CPU devices against 1 process x 4 devices.

Each process is a `python -m pipeline.main` subprocess with its own XLA_FLAGS
(2 emulated devices), joined over localhost by jax.distributed (gloo
collectives on CPU). Both runs fix every stage's `data.shards=2`, so they load
the same global batches; the 2-process run loads half of each per process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ('cold_start_sft', 'distill', 'rl_stem')

# The tiny default pipeline cut to one stage of each kind that trains a policy
# from data, from a teacher, and from rollouts; evaluation on one held-out item.
CONFIG = textwrap.dedent('''
    from configs import default

    def get_config():
      config = default.get_config('tiny')
      keep = {s.name: s for s in config.stages}
      config.stages = [keep[n] for n in %r]
      config.eval_untrained = False
      for stage in config.stages:
        stage.data.shards = 2
        stage.steps = min(stage.steps, 4)
        stage.checkpoint_every = 2
        stage.eval.max_new_tokens = 4
        stage.eval.batch_size = 4
        if 'filter' in stage:
          stage.filter.enabled = False
        for src in list(stage.data.sources.values())[1:]:
          src.eval_size = 0  # the first source's few items are enough
      return config
''' % (STAGES,))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_')}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={n}', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  return env


def launch(config_path: str, workdir: str, *, devices: int, num_processes: int = 1,
           port: int | None = None, timeout_s: int = 20, only: tuple[int, ...] | None = None):
  """Starts the processes of one run; returns the Popen objects."""
  procs = []
  for pid in (only if only is not None else range(num_processes)):
    cmd = [sys.executable, '-m', 'pipeline.main', f'--config={config_path}',
           f'--workdir={workdir}', '--distributed=off' if num_processes == 1 else
           f'--coordinator_address=localhost:{port}']
    if num_processes > 1:
      cmd += [f'--num_processes={num_processes}', f'--process_id={pid}',
              f'--distributed_timeout_s={timeout_s}']
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env_with_devices(devices),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def wait_all(procs, timeout_s: float) -> list[tuple[int, str]]:
  """(returncode, output) of each process; kills all of them past the timeout."""
  deadline = time.monotonic() + timeout_s
  out = []
  for p in procs:
    try:
      text, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      text, _ = p.communicate()
      pytest.fail(f'processes still running after {timeout_s} s; output:\n{text[-3000:]}')
    out.append((p.returncode, text))
  return out


def failure_report(results: list[tuple[int, str]]) -> str:
  """Every process's exit code, the first lines that look like an error (an
  abort's cause is printed long before its stack) and the output's tail."""
  parts = []
  for pid, (rc, text) in enumerate(results):
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines)
                  if re.search(r'Error|error:|ERROR|^[EF]\d{4} |Traceback', line)), len(lines))
    parts.append(f'--- process {pid}: exit code {rc}; from the first error line:\n'
                 + '\n'.join(lines[first:first + 40])[:4000]
                 + f'\n--- process {pid}: last lines:\n' + '\n'.join(lines[-30:])[-3000:])
  return '\n'.join(parts)


def load_final(stage_dir: str) -> dict:
  """A stage's final params as numpy arrays (whatever mesh wrote them)."""
  path = os.path.abspath(os.path.join(stage_dir, 'final'))
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return jax.tree.map(np.asarray, checkpointer.restore(path, target))


def assert_same_run(ref_dir: str, run_dir: str, stages=STAGES) -> None:
  for stage in stages:
    with open(os.path.join(ref_dir, stage, 'history.json')) as f:
      ref = json.load(f)
    with open(os.path.join(run_dir, stage, 'history.json')) as f:
      got = json.load(f)
    assert [r['step'] for r in got] == [r['step'] for r in ref], stage
    for a, b in zip(ref, got):
      np.testing.assert_allclose(b['loss'], a['loss'], rtol=1e-4, atol=1e-5,
                                 err_msg=f'{stage} step {a["step"]}')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5,
                                                          err_msg=stage),
                 load_final(os.path.join(ref_dir, stage)), load_final(os.path.join(run_dir, stage)))


def test_two_processes_match_one(tmp_path):
  config = tmp_path / 'mp_config.py'
  config.write_text(CONFIG)
  ref = launch(str(config), str(tmp_path / 'ref'), devices=4)
  (rc, text), = wait_all(ref, 600)
  assert rc == 0, text[-3000:]
  port = free_port()
  procs = launch(str(config), str(tmp_path / 'mp'), devices=2, num_processes=2, port=port,
                 timeout_s=120)
  results = wait_all(procs, 900)
  assert all(rc == 0 for rc, _ in results), failure_report(results)
  assert 'process 0 of 2, 2 local / 4 global devices' in results[0][1]
  assert_same_run(str(tmp_path / 'ref'), str(tmp_path / 'mp'))
  # Process 0 alone writes the reports.
  summary = json.loads((tmp_path / 'mp' / 'summary.json').read_text())
  assert [s['status'] for s in summary['stages']] == ['done'] * len(STAGES)
  assert list((tmp_path / 'mp' / 'cold_start_sft' / 'tensorboard').iterdir())
  # Checkpoints hold every process's data-iterator state.
  step_dir = tmp_path / 'mp' / 'cold_start_sft' / 'checkpoints'
  latest = max(int(p.name) for p in step_dir.iterdir() if p.name.isdigit())
  data_state = json.loads((step_dir / str(latest) / 'data' / 'metadata').read_text())
  assert len(data_state['process_states']) == 2


@pytest.mark.parametrize('present', [0, 1])
def test_missing_peer_is_a_clear_error(tmp_path, present):
  """One process of two starts: it exits with an error naming the problem
  after the start-up timeout instead of hanging (or aborting inside XLA)."""
  procs = launch(os.path.join(REPO, 'configs/default.py') + ':tiny', str(tmp_path / 'run'),
                 devices=1, num_processes=2, port=free_port(), timeout_s=3, only=(present,))
  (rc, text), = wait_all(procs, 120)
  assert rc != 0
  expected = ('processes [1] of 2 did not connect' if present == 0 else
              'did not gather all 2 processes')
  assert expected in text, text[-2000:]


# ---------------------------------------------- in-process: shards and states ---

def _fake_processes(monkeypatch, index: int, count: int) -> None:
  from pipeline import stage_data
  monkeypatch.setattr(stage_data.jax, 'process_index', lambda: index)
  monkeypatch.setattr(stage_data.jax, 'process_count', lambda: count)


def test_a_process_loads_its_rows_of_the_same_global_batch(tmp_path, monkeypatch):
  """Process 1 of 2 yields rows [B/2, B) of the batch one process makes with
  the same data.shards: the data do not depend on the process count."""
  from configs import default
  from data.tokenizer import train_tokenizer
  from pipeline import stage_data
  cfg = default.get_config('tiny').stages[0]
  cfg.data.shards = 4
  data = stage_data.load(cfg.data, seed=0)
  tok = train_tokenizer([m['content'] for r in data.all_train() for m in r['messages']], 512,
                        str(tmp_path))
  whole = stage_data.train_iterator(data, tok, cfg, seed=0)
  _fake_processes(monkeypatch, 1, 2)
  part = stage_data.train_iterator(data, tok, cfg, seed=0)
  assert len(part.shards) == 2  # shards 2 and 3 of 4
  for _ in range(2):
    a, b = next(whole), next(part)
    for k in a:
      np.testing.assert_array_equal(b[k], a[k][cfg.batch_size // 2:])
  # A shard count the processes cannot split evenly is refused.
  cfg.data.shards = 3
  with pytest.raises(ValueError, match='data.shards=3 must be a multiple of the 2 processes'):
    stage_data.train_iterator(data, tok, cfg, seed=0)


def test_checkpointed_data_states_are_per_process():
  from pipeline import checkpoint
  assert checkpoint.gather_process_states({'step': 3}) == [{'step': 3}]  # one process
  assert checkpoint.own_process_state({'process_states': [{'step': 3}]}, 'ckpt') == {'step': 3}
  assert checkpoint.own_process_state({'step': 3}, 'ckpt') == {'step': 3}  # older format
  with pytest.raises(ValueError, match='written by 2 processes but this run has 1'):
    checkpoint.own_process_state({'process_states': [{'step': 3}, {'step': 3}]}, 'ckpt')


def test_bad_launch_arguments_name_the_problem():
  from pipeline import distributed
  bad = [(dict(coordinator_address='localhost'), 'must be host:port'),
         (dict(coordinator_address='h:1', num_processes=2), 'needs --num_processes and'),
         (dict(coordinator_address='h:1', num_processes=2, process_id=2), r'process_id=2'),
         (dict(mode='sometimes'), '--distributed='),
         (dict(mode='off', coordinator_address='h:1', num_processes=2, process_id=0),
          'distributed=off but')]
  for kwargs, match in bad:
    with pytest.raises(ValueError, match=match):
      distributed.initialize(distributed.Launch(**kwargs))


class _AsProcess:
  """The `jax` a module sees, with process_index() = `index` (orbax and the
  arrays stay those of this single process)."""

  def __init__(self, index: int):
    self._index = index

  def process_index(self) -> int:
    return self._index

  def __getattr__(self, name):
    return getattr(jax, name)


def test_every_process_meets_the_same_barriers_importing_a_checkpoint(tmp_path, monkeypatch):
  """A barrier called in a process-0-only branch waits for peers that call
  another one (or none): the run aborts. Importing a Hugging Face checkpoint
  as process 0 and as process 1 must pass the same barriers in order."""
  from jax.experimental import multihost_utils

  from configs import hf_example
  from data.hf_tokenizer import HFTokenizer
  from pipeline import checkpoint, runner, sharding
  from test_hf_pipeline import make_checkpoint
  teacher = make_checkpoint(tmp_path / 'teacher', 'qwen2', hidden_size=16,
                            num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
  config = hf_example.get_config(f'{teacher},tiny')
  tokenizer = HFTokenizer.load(teacher)
  model_cfg = runner.model_configs(config, tokenizer.vocab_size)['teacher']
  mesh = sharding.make_mesh(tuple(config.mesh.shape))
  rules = tuple(tuple(r) for r in config.mesh.rules)
  barriers = {}
  for index in (0, 1):
    workdir = str(tmp_path / f'as_process_{index}')
    names = barriers[index] = []
    monkeypatch.setattr(multihost_utils, 'sync_global_devices',
                        lambda name: names.append(name.replace(workdir, '<workdir>')))
    monkeypatch.setattr(runner, 'jax', _AsProcess(index))
    monkeypatch.setattr(checkpoint, 'jax', _AsProcess(index))
    runner.ensure_hf_params(config, 'teacher', model_cfg, mesh, rules, tokenizer, workdir)
  assert barriers[0] and barriers[1] == barriers[0]
  assert os.path.exists(tmp_path / 'as_process_0' / 'hf_init' / 'teacher' / 'model_meta.json')


def test_a_file_process_0_writes_next_is_looked_up_before_it_exists(tmp_path, monkeypatch):
  """GRPO's filter.json: process 0 writes it right after the lookup, so a
  process that looked later would resume alone (or read half a file)."""
  from jax.experimental import multihost_utils

  from pipeline import checkpoint
  path = tmp_path / 'filter.json'
  # The barrier releases and process 0 writes the file at once.
  monkeypatch.setattr(multihost_utils, 'sync_global_devices',
                      lambda name: checkpoint.write_json(str(path), {'kept': []}))
  assert not checkpoint.exists_on_every_process(str(path))
  assert checkpoint.exists_on_every_process(str(path))


def test_json_writes_are_atomic(tmp_path):
  """A write that fails midway leaves the previous file whole."""
  from pipeline import checkpoint
  path = str(tmp_path / 'summary.json')
  checkpoint.write_json(path, {'stages': [1, 2]})
  with pytest.raises(TypeError):
    checkpoint.write_json(path, {'stages': [1, object()]})
  with open(path) as f:
    assert json.load(f) == {'stages': [1, 2]}
