"""The command line end to end: outputs, re-runs, overrides, resume after
SIGKILL, SIGTERM, and clear errors for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from pipeline import checkpoint, evaluate, loop, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/default.py:tiny'
ONE_DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])
# The command-line runs use 2 emulated devices, not the suite's 8: the mesh
# still shards every stage (8-way meshes are tested in-process) and a run
# takes ~40% less time on this 2-core machine (tiny distill 74 s -> 44 s).
ENV = {**os.environ, 'PYTHONPATH': ROOT,
       'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}


def cli(workdir, *overrides, timeout=900):
  """Runs `python -m pipeline.main` like a user would; returns the process."""
  return subprocess.run([sys.executable, '-m', 'pipeline.main', f'--config={TINY}',
                         f'--workdir={workdir}', *overrides], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=timeout)


def start_cli(workdir, *overrides):
  return subprocess.Popen([sys.executable, '-m', 'pipeline.main', f'--config={TINY}',
                           f'--workdir={workdir}', *overrides], cwd=ROOT, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def final_params(workdir, stage):
  """The params a stage wrote, as numpy (restored onto one device)."""
  path = os.path.join(workdir, stage, 'final')
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny'))
  proc = cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_outputs_of_a_run(tiny_run):
  with open(os.path.join(tiny_run, 'summary.json')) as f:
    summary = json.load(f)
  names = [s['name'] for s in summary['stages']]
  assert names == [s.name for s in default.get_config('tiny').stages]
  for stage in summary['stages']:
    assert set(stage) == {'name', 'kind', 'status', 'steps', 'wall_s', 'eval'}
    assert stage['status'] == 'done' and stage['steps'] > 0 and stage['wall_s'] > 0
    key = 'pairwise_accuracy' if stage['kind'] == 'reward_model' else 'accuracy'
    assert 0.0 <= stage['eval'][key] <= 1.0
    stage_dir = os.path.join(tiny_run, stage['name'])
    assert os.listdir(os.path.join(stage_dir, 'tensorboard'))
    assert os.path.isdir(os.path.join(stage_dir, 'final'))
    assert os.path.exists(os.path.join(stage_dir, 'eval.md'))
  assert set(summary['untrained']) == {'model', 'eval'}
  # Per-item scores of every policy and of the baseline, on the same items.
  item_ids = None
  for stage in ['untrained'] + [s['name'] for s in summary['stages']
                                if s['kind'] != 'reward_model']:
    items = evaluate.read_items(os.path.join(tiny_run, stage, loop.EVAL_ITEMS_FILE))
    assert all(0.0 <= item['score'] <= 1.0 and isinstance(item['completion'], str)
               for item in items.values())
    # sound: a bool for math items (never without a right answer), None for the rest
    assert all((item['sound'] is None) == (item['task'] in evaluate.CODE_TASKS
                                           + evaluate.AGENT_TASKS)
               and item['score'] >= bool(item['sound']) for item in items.values())
    assert item_ids in (None, set(items)) and 'chat' not in {i['task'] for i in items.values()}
    item_ids = set(items)
  chats = [r for r in runner.run_data(default.get_config('tiny'))[1] if r['task'] == 'chat']
  assert len(item_ids) == summary['untrained']['eval']['num_eval'] - len(chats)
  assert 'accuracy' in summary['untrained']['eval']
  assert 'sound_accuracy' in summary['untrained']['eval']
  with open(os.path.join(tiny_run, 'config.json')) as f:
    assert json.load(f)['stages'][0]['name'] == 'cold_start_sft'
  # The band filter's kept prompts and how often the stage reuses each.
  rl_stem = default.get_config('tiny').stages[3]
  with open(os.path.join(tiny_run, 'rl_stem', 'filter.json')) as f:
    kept = json.load(f)
  assert kept['stats']['kept'] == len(kept['kept']) > 0
  assert kept['stats']['uses_per_prompt'] == pytest.approx(
      rl_stem.steps * rl_stem.prompts_per_step / len(kept['kept']))
  assert os.path.exists(os.path.join(tiny_run, 'tokenizer', 'tokenizer.model'))


def test_rerun_skips_finished_stages(tiny_run):
  before = os.path.getmtime(os.path.join(tiny_run, 'overall_sft', 'final'))
  proc = cli(tiny_run)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('done already, skipping') == len(default.get_config('tiny').stages)
  assert os.path.getmtime(os.path.join(tiny_run, 'overall_sft', 'final')) == before


def test_stop_after_a_finished_stage_runs_nothing_after_it(tiny_run, tmp_path):
  names = [s.name for s in default.get_config('tiny').stages]
  workdir = str(tmp_path / 'run')
  runner.copy_run_without(tiny_run, workdir, names[2:])
  proc = cli(workdir, '--config.stop_after=overall_sft')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert [s['status'] for s in json.load(f)['stages']][2:] == ['pending'] * (len(names) - 2)


def test_unequal_eval_budgets_are_an_error(tmp_path):
  """Every row of the summary scores the same held-out suite: one generation
  budget, or the rows do not compare (a 64-token budget once cut traces)."""
  proc = cli(str(tmp_path), '--config.stages.6.eval.max_new_tokens=8')
  assert proc.returncode != 0
  assert 'config.stages[*].eval.max_new_tokens differ' in proc.stderr
  assert "'rl_preference': 8" in proc.stderr
  assert not os.path.exists(tmp_path / 'summary.json')  # nothing ran


def test_mistyped_key_names_it(tmp_path):
  proc = cli(str(tmp_path), '--config.stages.0.stepz=2')
  assert proc.returncode != 0
  assert 'stepz' in proc.stderr


def test_unknown_stage_kind_lists_valid_ones(tmp_path):
  config = default.get_config('tiny')
  config.stages[1].kind = 'dpo'
  with pytest.raises(ValueError,
                     match=r"kind='dpo'.*valid kinds: \['distill', 'grpo', 'reward_model', 'sft'"):
    runner.run_pipeline(config, str(tmp_path))
  assert not os.listdir(tmp_path)  # failed before writing anything


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(ValueError, match='not a writable directory'):
    runner.run_pipeline(default.get_config('tiny'), str(blocker / 'run'))


def test_checkpoint_shape_mismatch_names_the_parameter(tiny_run):
  path = os.path.join(tiny_run, 'cold_start_sft', 'final')
  saved = final_params(tiny_run, 'cold_start_sft')
  wrong = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                      sharding=ONE_DEVICE), saved)
  wq = wrong['blocks']['1']['attn']['wq_dnh']
  wrong['blocks']['1']['attn']['wq_dnh'] = jax.ShapeDtypeStruct(
      (wq.shape[0] * 2,) + wq.shape[1:], wq.dtype, sharding=ONE_DEVICE)
  files_before = sorted((p, os.path.getsize(os.path.join(p, f)))
                        for p, _, fs in os.walk(path) for f in fs)
  with pytest.raises(ValueError, match=r"'blocks/1/attn/wq_dnh' has shape \(32, 2, 16\)"):
    checkpoint.load_params(path, wrong)
  files_after = sorted((p, os.path.getsize(os.path.join(p, f)))
                       for p, _, fs in os.walk(path) for f in fs)
  assert files_before == files_after


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(tmp_path):
  overrides = ['--config.stages.0.steps=40', '--config.stages.0.checkpoint_every=4',
               '--config.stages.1.steps=2', '--config.stop_after=overall_sft',
               '--config.eval_untrained=False']
  reference = tmp_path / 'reference'
  assert cli(str(reference), *overrides).returncode == 0

  killed = tmp_path / 'killed'
  proc = start_cli(str(killed), *overrides)
  ckpt_dir = killed / 'cold_start_sft' / 'checkpoints'
  deadline = time.time() + 180
  while not (ckpt_dir.exists() and any(d.isdigit() for d in os.listdir(ckpt_dir))):
    assert proc.poll() is None and time.time() < deadline, 'run ended before a checkpoint'
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()]
  assert max(steps) < 40, 'the kill landed after the stage finished; nothing was tested'
  with open(killed / 'summary.json') as f:
    assert json.load(f)['stages'][0]['status'] == 'running'

  resumed = cli(str(killed), *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step' in resumed.stderr
  for stage in ('cold_start_sft', 'overall_sft'):
    jax.tree.map(np.testing.assert_array_equal, final_params(str(killed), stage),
                 final_params(str(reference), stage))


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
  proc = start_cli(str(tmp_path), '--config.stages.0.steps=400', '--config.stop_after=cold_start_sft',
                   '--config.stages.0.checkpoint_every=1000', '--config.stages.0.log_every=1')
  deadline = time.time() + 180
  log = ''
  while 'step 3/400' not in log:
    assert proc.poll() is None and time.time() < deadline
    log += proc.stderr.readline()
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=120)
  assert proc.returncode == 0, rest[-3000:]
  steps = [int(d) for d in os.listdir(tmp_path / 'cold_start_sft' / 'checkpoints') if d.isdigit()]
  assert steps and max(steps) < 400


def test_generate_from_a_stage(tiny_run):
  base = [sys.executable, '-m', 'pipeline.generate', f'--workdir={tiny_run}',
          '--max_new_tokens=8']
  one = subprocess.run(base + ['--stage=rl_stem', '--prompt=Calculate 1 + 2.'], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-2000:]
  interactive = subprocess.run(base + ['--stage=overall_sft'], input='hello\nhow are you\n\n',
                               cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert interactive.returncode == 0, interactive.stderr[-2000:]
  assert interactive.stdout.count('> ') == 3  # two turns, then the empty line ends it
  wrong = subprocess.run(base + ['--stage=reward_model', '--prompt=x'], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
  assert wrong.returncode != 0 and 'is a reward model' in wrong.stderr


def test_sigterm_in_distill_and_grpo_then_resume_equals_uninterrupted(tiny_run, tmp_path):
  """Preempted mid-distill (GKD on-policy steps included) and mid-GRPO, the
  resumed run ends with the very params of the uninterrupted one: rng, data
  position, pairs, on-policy choices and filter state all resume."""
  names = [s.name for s in default.get_config('tiny').stages]
  workdir = tmp_path / 'run'
  runner.copy_run_without(tiny_run, str(workdir), names[2:])
  overrides = ['--config.stop_after=rl_stem', '--config.stages.2.log_every=1',
               '--config.stages.3.log_every=1']
  for stage, total in (('distill', 8), ('rl_stem', 2)):
    proc = start_cli(str(workdir), *overrides)
    deadline, log = time.time() + 600, ''
    while f'{stage} step 1/{total}' not in log:
      assert proc.poll() is None and time.time() < deadline, log[-3000:]
      log += proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    steps = [int(d) for d in os.listdir(workdir / stage / 'checkpoints') if d.isdigit()]
    assert steps and max(steps) < total, 'the stage finished before the signal: nothing tested'
  resumed = cli(str(workdir), *overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for stage in ('distill', 'rl_stem'):
    jax.tree.map(np.testing.assert_array_equal, final_params(str(workdir), stage),
                 final_params(tiny_run, stage))


def test_relative_workdir_and_overrides_by_index(tmp_path):
  """`--workdir=runs/x` as in the README (checkpoints need absolute paths),
  with stage settings overridden by index."""
  proc = subprocess.run([sys.executable, '-m', 'pipeline.main',
                         f'--config={os.path.join(ROOT, "configs/default.py")}:tiny',
                         '--workdir=runs/relative', '--config.stop_after=overall_sft',
                         '--config.stages.0.steps=2', '--config.stages.0.checkpoint_every=1',
                         '--config.stages.1.steps=1', '--config.eval_untrained=False'],
                        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / 'runs' / 'relative'
  assert os.path.isdir(workdir / 'cold_start_sft' / 'checkpoints' / '2')
  with open(workdir / 'summary.json') as f:
    stages = json.load(f)['stages']
  assert [s['steps'] for s in stages[:2]] == [2, 1]
  assert all(s['status'] == 'pending' for s in stages[2:])


def test_tiny_distill_takes_on_policy_steps(tiny_run):
  """The tiny config sets GKD's λ = 0.5: some logged steps are on-policy."""
  with open(os.path.join(tiny_run, 'distill', 'history.json')) as f:
    flags = [row['on_policy'] for row in json.load(f)]
  assert len(flags) == 8 and set(flags) == {0.0, 1.0}  # seeded: both kinds occur


def test_grpo_with_kl_to_the_reference(tiny_run, tmp_path):
  """β > 0 keeps the starting params as the reference, apart from the train
  state's buffers, which each step donates (a shared buffer was deleted by
  the first update)."""
  names = [s.name for s in default.get_config('tiny').stages]
  workdir = tmp_path / 'run'
  runner.copy_run_without(tiny_run, str(workdir), names[3:])
  proc = cli(str(workdir), '--config.stop_after=rl_stem', '--config.stages.3.grpo.beta=0.1',
             '--config.stages.3.log_every=1')
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'rl_stem' / 'history.json') as f:
    kls = [row['kl_ref'] for row in json.load(f)]
  assert len(kls) == 2 and all(np.isfinite(kls)) and kls[0] == 0.0 <= kls[1]


def test_rl_headroom_on_a_stage(tiny_run):
  """experiments.rl_headroom reloads a finished run (config, data, params) and
  reports greedy against sampled accuracy on the same items."""
  proc = subprocess.run([sys.executable, '-m', 'experiments.rl_headroom', tiny_run, 'distill',
                         '--k=2', '--temperatures=1.0,0.0'], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(tiny_run, 'distill', 'rl_headroom.json')) as f:
    result = json.load(f)
  with open(os.path.join(tiny_run, 'distill', 'eval_items.jsonl')) as f:
    items = [json.loads(line) for line in f]
  scored = [i['score'] for i in items if evaluate.is_math(i) or i['task'] in evaluate.CODE_TASKS]
  overall = result['table']['all']
  assert overall['n'] == len(scored) and overall['greedy'] == pytest.approx(np.mean(scored))
  # T = 0 samples are greedy completions: they score what the held-out suite
  # scored, up to an item whose argmax flips with the batch's padding bucket.
  assert overall['0.0']['avg'] == pytest.approx(overall['greedy'], abs=1.01 / len(scored))
  assert '| all |' in proc.stdout


def test_reevaluate_adds_sampled_pass_at_1(tiny_run, tmp_path):
  """--reevaluate scores finished stages again under new eval settings
  (here eval.samples) without training: avg@k joins the summary and the
  items file, the stage's other metrics and params stay."""
  workdir = str(tmp_path / 'run')
  runner.copy_run_without(tiny_run, workdir, [])
  with open(os.path.join(workdir, 'summary.json')) as f:
    before = {s['name']: s for s in json.load(f)['stages']}
  samples = [f'--config.stages.{i}.eval.{key}={value}' for i in (2, 3)
             for key, value in (('samples', 2), ('temperature', 0.0))]
  proc = cli(workdir, '--reevaluate=distill,rl_stem', *samples)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'summary.json')) as f:
    after = {s['name']: s for s in json.load(f)['stages']}
  for name in ('distill', 'rl_stem'):
    assert after[name]['steps'] == before[name]['steps']
    assert 'sampled/accuracy' in after[name]['eval'] and 'sampled/accuracy' not in before[name]['eval']
    items = evaluate.read_items(os.path.join(workdir, name, loop.EVAL_ITEMS_FILE))
    verifiable = [i for i in items.values()
                  if evaluate.is_math(i) or i['task'] in evaluate.CODE_TASKS]
    assert all(i['sampled'] is not None for i in verifiable)
    assert all(i['sampled'] is None for i in items.values() if i['task'] in evaluate.AGENT_TASKS)
    # T = 0 samples are greedy completions: avg@k is the greedy score, up to
    # an item whose argmax flips with the batch's padding bucket.
    greedy, sampled = (np.mean([i[key] for i in verifiable]) for key in ('score', 'sampled'))
    assert sampled == pytest.approx(greedy, abs=1.01 / len(verifiable))
  assert after['distill']['eval']['size_ratio'] == before['distill']['eval']['size_ratio']
  assert after['distill']['eval']['sampled/k'] == 2
  with open(os.path.join(workdir, 'config.json')) as f, open(
      os.path.join(tiny_run, 'config.json')) as g:
    assert f.read() == g.read()  # still the config that trained the stages
  assert after['rl_code'] == before['rl_code']  # not asked for


def test_reevaluate_bad_stage_names(tiny_run, tmp_path):
  config = default.get_config('tiny')
  with pytest.raises(ValueError, match="'nope' is not a stage"):
    runner.reevaluate(config, tiny_run, ['nope'])
  with pytest.raises(ValueError, match="'reward_model' is a reward model"):
    runner.reevaluate(config, tiny_run, ['reward_model'])
  workdir = str(tmp_path / 'run')
  runner.copy_run_without(tiny_run, workdir, ['rl_preference'])
  with pytest.raises(ValueError, match="'rl_preference' has not finished"):
    runner.reevaluate(config, workdir, ['rl_preference'])


def test_unequal_sampled_eval_settings_are_an_error(tmp_path):
  proc = cli(str(tmp_path), '--config.stages.2.eval.samples=4',
             '--config.stages.3.eval.samples=8')
  assert proc.returncode != 0 and 'eval.(samples, temperature) differ' in proc.stderr
