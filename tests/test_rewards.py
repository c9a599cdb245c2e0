"""Reward functions and the isolated reward system (pipeline/rewards.py)."""

import json
import math
import os
import time
import multiprocessing

import numpy as np
import pytest

from pipeline import rewards

# Robustness tests use short limits so that a hang costs well under a second.
TIMEOUT_S = 0.5
GRACE_S = 0.5


def math_record(answer, task='basic_arithmetic'):
  entry = {'question': 'q', 'answer': answer, 'metadata': {}}
  return {'id': f'{task}/0', 'task': task, 'answer': answer, 'entry': json.dumps(entry)}


def code_record(tests, task='code_gen'):
  return {'id': f'{task}/0', 'task': task, 'tests': tests}


AGENT_RECORD = {'id': 'agent/0', 'task': 'agent', 'ordered': False,
                'accepted_calls': [{'name': 'add', 'arguments': {'a': [1], 'b': [2]}}]}
CHAT_RECORD = {'id': 'chat/0', 'task': 'chat'}


def stem(completion, answer='3'):
  return rewards.stem_reward([''], [completion], records=[math_record(answer)])[0]


def child_pids():
  """Pids (zombies included) whose parent is this process, read from /proc."""
  me, out = str(os.getpid()), []
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      with open(f'/proc/{pid}/stat') as f:
        stat = f.read()
    except OSError:
      continue
    if stat.rsplit(')', 1)[1].split()[1] == me:
      out.append(pid)
  return out


def alive(pid):
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
  except OSError:
    return False


@pytest.fixture
def no_leftovers():
  before = set(child_pids())
  yield
  assert multiprocessing.active_children() == []
  assert set(child_pids()) <= before, 'a reward child process was left behind'


def system(fn, n_workers=2, **kw):
  return rewards.RewardSystem({'f': fn}, {'f': 1.0}, timeout_s=TIMEOUT_S, grace_s=GRACE_S,
                              workers=n_workers, **kw)


# ------------------------------------------------------------------- STEM ---

def test_stem_correct_and_incorrect_integers():
  assert stem('<think>1+2=3</think><answer>3</answer>') == 1.0
  assert stem('<think></think><answer>4</answer>') == 0.0
  assert stem('<answer>-4</answer>', answer='-4') == 1.0
  assert stem('<answer> 3 </answer>') == 1.0
  assert stem('no answer at all') == 0.0


def test_stem_equivalent_forms():
  assert stem('<answer>1/2</answer>', answer='0.5') == 1.0
  assert stem('<answer>\\frac{1}{2}</answer>', answer='0.5') == 1.0
  assert stem('<answer>0.5</answer>', answer='1/2') == 1.0
  assert stem('<answer>3.0</answer>') == 1.0
  assert stem('<answer>x = 3</answer>') == 1.0
  assert stem('<answer>1,000</answer>', answer='1000') == 1.0
  assert stem('<answer>0.6</answer>', answer='1/2') == 0.0
  # Expressions are not trusted to math-verify: the question copied would pass.
  assert stem('<answer>8/2</answer>', answer='4') == 0.0
  assert stem('<answer>5 - 1</answer>', answer='4') == 0.0


def test_stem_boxed():
  assert stem('so the answer is \\boxed{3}.') == 1.0
  assert stem('\\boxed{4} no wait \\boxed{3}') == 1.0  # the last one counts
  assert stem('\\boxed{3} no wait \\boxed{4}') == 0.0
  assert stem('<answer>\\boxed{\\frac{1}{2}}</answer>', answer='0.5') == 1.0


@pytest.mark.parametrize('answer', ['3 or 4', '3, 4', '3; 4', '3 4', '3\n4', '\\pm 3', '±3',
                                    '3 and 4', 'x = 3 = 4', 'either 3', '4 or 3',
                                    '\\boxed{3} \\boxed{4}'])
def test_stem_several_candidates_score_zero(answer):
  assert stem(f'<answer>{answer}</answer>') == 0.0


def test_stem_list_reference_keeps_its_candidates():
  assert not rewards.several_candidates('(3, 4)', '(3, 4)')
  assert rewards.several_candidates('3, 4, 5', '3, 4')


@pytest.mark.parametrize('completion', ['<answer></answer>', '<answer>   </answer>',
                                        '<answer>\n</answer>', '\\boxed{}'])
def test_stem_empty_answer_scores_zero(completion):
  assert stem(completion) == 0.0


@pytest.mark.parametrize('completion', [
    '<answer>3',  # unclosed
    '3</answer>',  # stray closing tag
    '<answer><answer>3</answer></answer>',  # nested
    '<answer>3</answer><answer>3',  # complete, then unclosed
    '<answer>3</answer></answer>',
    '\\boxed{3',  # unbalanced
    '\\boxed{3}  \\boxed{3',
])
def test_stem_malformed_markup_scores_zero(completion):
  assert stem(completion) == 0.0


def test_stem_only_the_final_answer_counts():
  assert stem('<answer>3</answer> hmm, actually <answer>4</answer>') == 0.0
  assert stem('<answer>4</answer> hmm, actually <answer>3</answer>') == 1.0


def test_stem_not_applicable_to_other_tasks():
  records = [code_record(['assert True']), AGENT_RECORD, CHAT_RECORD, math_record('3', 'gcd')]
  out = rewards.stem_reward([''] * 4, ['<answer>3</answer>'] * 4, records=records)
  assert out == [None, None, None, 1.0]


# ------------------------------------------------------------------ steps ---

def test_steps_reward():
  records = [math_record('120', 'chain_sum')] * 4 + [CHAT_RECORD]
  completions = ['<think>8+2=10, 9+2+1=12 = 120</think><answer>120</answer>',
                 '<think>8+2=11, 9+2+1=12 = 120</think><answer>120</answer>',
                 '<think>no claim</think><answer>120</answer>',
                 '<think>8+2=10</think><answer>3+4=8</answer>',  # only the reasoning counts
                 '<think>1+1=3</think>']
  assert rewards.steps_reward([''] * 5, completions, records=records) == [
      1.0, 0.0, None, 1.0, None]
  assert rewards.sound_stem_reward([''] * 5, completions, records=records) == [
      1.0, 0.0, 0.0, 0.0, None]


# ------------------------------------------------------------------- code ---

ADD_TESTS = ['assert add(1, 2) == 3', 'assert add(0, 0) == 0', 'assert add(2, 2) == 4',
             'assert add(-1, 1) == 0']


def answer(code):
  return f'<think>plan</think><answer>\n```python\n{code}\n```\n</answer>'


def test_code_reward_pass_fraction_and_not_applicable():
  records = [code_record(ADD_TESTS)] * 4 + [
      code_record(['def check(f):\n  assert f(1, 2) == 3\ncheck(add)\n'], 'humaneval'),
      code_record(['def check(f):\n  assert f(1, 2) == 3\ncheck(add)\n'], 'humaneval'),
      math_record('3')]
  completions = [answer('def add(a, b):\n    return a + b'),
                 answer('def add(a, b):\n    return a + b if a > 0 else 1'),  # 2 of 4
                 answer('def add(a, b):\n    return 0'),  # passes add(0, 0) and add(-1, 1)
                 'no program here',
                 answer('def add(a, b):\n    return a + b'),
                 answer('def add(a, b):\n    return a * b'),
                 answer('def add(a, b):\n    return a + b')]
  out = rewards.code_reward([''] * 7, completions, records=records)
  assert out == [1.0, 0.5, 0.5, 0.0, 1.0, 0.0, None]


def test_code_reward_contains_hostile_programs(tmp_path):
  marker = tmp_path / 'pwned'
  program = f"import os\nos.system('touch {marker}')\ndef add(a, b):\n    return a + b"
  start = time.monotonic()
  out = rewards.code_reward([''], [answer(program)], records=[code_record(ADD_TESTS)])
  assert time.monotonic() - start < 10
  assert out == [0.0]  # the sandbox refuses os.system: the program crashes
  assert not marker.exists()


# --------------------------------------------------------- agent, format ---

def test_agent_reward():
  good = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
  bad = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 3}}</tool_call>'
  out = rewards.agent_reward([''] * 3, [good, bad, good],
                             records=[AGENT_RECORD, AGENT_RECORD, math_record('3')])
  assert out == [1.0, 0.0, None]


@pytest.mark.parametrize('completion,expected', [
    ('<think>t</think><answer>3</answer>', 1.0),
    ('  <think>\nt\n</think>\n<answer>3</answer>\n', 1.0),
    ('<think></think><answer>3</answer>', 1.0),  # an empty trace is still the shape
    ('<think>t</think><answer>3</answer> trailing', 0.0),
    ('<answer>3</answer>', 0.0),
    ('<think>t</think>text<answer>3</answer>', 0.0),
    ('<think>t</think><answer></answer>', 0.0),
    ('<think>t</think><answer><answer>3</answer></answer>', 0.0),
    ('<think>t<think>u</think><answer>3</answer>', 0.0),
    ('<answer>3</answer><think>t</think>', 0.0),
    ('<think>t</think><answer>3', 0.0),
])
def test_format_reward_answer_shape(completion, expected):
  assert rewards.format_reward([''], [completion], records=[math_record('3')]) == [expected]


@pytest.mark.parametrize('completion,expected', [
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', 1.0),
    ('<think>t</think>\n<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n'
     '<tool_call>{"name": "g", "arguments": {}}</tool_call>', 1.0),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call> done', 0.0),
    ('<tool_call>{"name": "f"}</tool_call>', 0.0),
    ('<tool_call>not json</tool_call>', 0.0),
    ('<tool_call>{"name": "f", "arguments": {}}', 0.0),
    ('<answer>3</answer>', 0.0),
    ('', 0.0),
])
def test_format_reward_tool_call_shape(completion, expected):
  assert rewards.format_reward([''], [completion], records=[AGENT_RECORD]) == [expected]


def test_format_reward_not_applicable_to_chat():
  assert rewards.format_reward([''], ['hi'], records=[CHAT_RECORD]) == [None]


# --------------------------------------------------------------- overlong ---

def test_overlong_penalty_values():
  fn = rewards.overlong_penalty(128, 16)
  lengths = [10, 112, 113, 120, 127, 128, 50]
  truncated = [False] * 6 + [True]
  out = fn([''] * 7, [''] * 7, lengths=lengths, truncated=truncated)
  np.testing.assert_allclose(out, [0.0, 0.0, -1 / 16, -0.5, -15 / 16, -1.0, -1.0])
  assert rewards.overlong_penalty(128, 0)([''] * 2, [''] * 2, lengths=[128, 127]) == [-1.0, 0.0]


@pytest.mark.parametrize('max_new_tokens,buffer', [(0, 0), (128, -1), (128, 129), (128, 1.5)])
def test_overlong_penalty_invalid(max_new_tokens, buffer):
  with pytest.raises(ValueError):
    rewards.overlong_penalty(max_new_tokens, buffer)


# ---------------------------------------------------- combination, stats ---

def _first_column(prompts, completions, *, a, **unused):
  return list(a)


def _second_column(prompts, completions, *, b, **unused):
  return list(b)


def test_weighted_total_matches_hand_computation(no_leftovers):
  a = [1.0, None, 0.5, None]
  b = [0.0, 2.0, None, None]
  system = rewards.RewardSystem({'a': _first_column, 'b': _second_column}, {'a': 2.0, 'b': -0.5},
                                isolate={'b': False}, timeout_s=5.0)
  total, per_function, stats = system(['p'] * 4, ['c'] * 4, a=a, b=b)
  np.testing.assert_allclose(total, [2.0 * 1.0 - 0.5 * 0.0, -0.5 * 2.0, 2.0 * 0.5, 0.0])
  np.testing.assert_array_equal(per_function['a'], [1.0, np.nan, 0.5, np.nan])
  np.testing.assert_array_equal(per_function['b'], [0.0, 2.0, np.nan, np.nan])
  assert stats['unscored'] == 1
  assert stats['a/mean'] == pytest.approx(0.75) and stats['a/std'] == pytest.approx(0.25)
  assert stats['a/applicable'] == 0.5 and stats['b/applicable'] == 0.5
  assert stats['b/mean'] == pytest.approx(1.0)
  assert stats['a/failures'] == stats['b/failures'] == stats['failures'] == 0
  assert stats['total/mean'] == pytest.approx(np.mean([2.0, -1.0, 1.0, 0.0]))
  assert stats['a/wall_s'] >= 0 and stats['wall_s'] >= 0


def test_empty_batch():
  total, per_function, stats = system(_first_column)([], [], a=[])
  assert total.shape == (0,) and per_function['f'].shape == (0,) and stats['unscored'] == 0


def test_invalid_system_arguments():
  with pytest.raises(ValueError, match='weights'):
    rewards.RewardSystem({'f': _first_column}, {'g': 1.0})
  with pytest.raises(ValueError, match='isolate'):
    rewards.RewardSystem({'f': _first_column}, {'f': 1.0}, isolate={'g': False})
  with pytest.raises(ValueError, match='callable'):
    rewards.RewardSystem({'f': 3}, {'f': 1.0})
  with pytest.raises(ValueError, match="column 'a'"):
    system(_first_column)(['p'] * 2, ['c'] * 2, a=[1.0])


def test_default_reward_system_names():
  with pytest.raises(ValueError, match="valid names: \\['stem', 'steps', 'sound_stem', 'code', "):
    rewards.default_reward_system({'functions': {'stme': 1.0}})
  with pytest.raises(ValueError, match='overlong'):
    rewards.default_reward_system({'functions': {'overlong': 1.0}})
  with pytest.raises(ValueError, match='unknown reward config keys'):
    rewards.default_reward_system({'functions': {'stem': 1.0}, 'timeout': 3})
  rm = lambda prompts, completions, **unused: [0.5] * len(completions)
  s = rewards.default_reward_system({'functions': {'stem': 1.0, 'rm': 0.5}},
                                    extra_functions={'rm': rm})
  assert s.isolate == {'stem': True, 'rm': False}


def test_default_reward_system_end_to_end(no_leftovers):
  cfg = {'functions': {'stem': 1.0, 'code': 1.0, 'agent': 1.0, 'format': 0.1,
                       'overlong': 0.1},
         'timeout_s': 10.0, 'max_new_tokens': 128, 'overlong_buffer': 16}
  s = rewards.default_reward_system(cfg)
  records = [math_record('3'), code_record(ADD_TESTS), AGENT_RECORD, CHAT_RECORD]
  completions = ['<think>t</think><answer>3</answer>',
                 answer('def add(a, b):\n    return a + b'),
                 '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
                 'hello']
  total, per_function, stats = s([''] * 4, completions, records=records,
                                 truncated=[False, False, False, True],
                                 lengths=[10, 120, 10, 128], max_new_tokens=128)
  np.testing.assert_allclose(total, [1.1, 1.0 + 0.1 - 0.05, 1.0 + 0.1, -0.1])
  assert stats['failures'] == 0 and stats['unscored'] == 0
  np.testing.assert_array_equal(per_function['stem'], [1.0, np.nan, np.nan, np.nan])


# ------------------------------------------------------------- robustness ---

def _spin(prompts, completions, **unused):
  while True:
    pass


def _sleep(prompts, completions, **unused):
  time.sleep(1000)


def _swallow_alarm(prompts, completions, **unused):
  while True:
    try:
      time.sleep(1000)
    except BaseException:  # noqa: BLE001  a verifier that eats every exception
      pass


def _raise(prompts, completions, **unused):
  raise RuntimeError('verifier bug')


def _exit(prompts, completions, **unused):
  os._exit(1)


def _segfault(prompts, completions, **unused):
  import ctypes
  ctypes.string_at(0)


def _sys_exit(prompts, completions, **unused):
  raise SystemExit(3)


def _hang_on_marked(prompts, completions, **unused):
  if completions[0] == 'hang':
    time.sleep(1000)
  return [1.0]


def _exit_on_marked(prompts, completions, **unused):
  if completions[0] == 'die':
    os._exit(0)
  return [0.5]


def _memory_hog(prompts, completions, **unused):
  return [len([bytearray(10**8) for _ in range(100)])]


def _returns(value):
  def fn(prompts, completions, **unused):
    return value
  return fn


def _check_failed(system_, n, max_wall_s, **columns):
  start = time.monotonic()
  total, per_function, stats = system_(['p'] * n, [f'c{i}' for i in range(n)], **columns)
  wall = time.monotonic() - start
  assert wall < max_wall_s, f'took {wall:.1f} s'
  np.testing.assert_array_equal(per_function['f'], np.zeros(n))
  np.testing.assert_array_equal(total, np.zeros(n))
  assert stats['f/failures'] == n
  return stats


@pytest.mark.parametrize('fn', [_spin, _sleep], ids=['busy_loop', 'sleep'])
def test_hang_is_cut_by_the_per_item_alarm(fn, no_leftovers):
  # 4 items over 2 workers: 2 alarms of 0.5 s each in series.
  _check_failed(system(fn), 4, max_wall_s=2 * TIMEOUT_S + 2.0)


def test_hang_that_swallows_the_alarm_is_killed(no_leftovers):
  # Each item is killed at timeout + grace, then a new child takes the rest.
  _check_failed(system(_swallow_alarm), 4, max_wall_s=2 * (TIMEOUT_S + GRACE_S) + 2.0)


@pytest.mark.parametrize('fn', [_raise, _exit, _segfault, _sys_exit],
                         ids=['raises', 'os_exit', 'segfault', 'sys_exit'])
def test_crashes_score_zero(fn, no_leftovers):
  _check_failed(system(fn), 4, max_wall_s=10.0)


@pytest.mark.parametrize('value', [[0.1, 0.2], [], [math.nan], ['1.0'], [math.inf], [-math.inf],
                                   [2e6], None, 1.0, {'a': 1}, [[1.0]], [1j]],
                         ids=['too_long', 'empty', 'nan', 'str', 'inf', '-inf', 'huge', 'none',
                              'scalar', 'dict', 'nested', 'complex'])
def test_garbage_outputs_score_zero(value, no_leftovers):
  _check_failed(system(_returns(value)), 3, max_wall_s=10.0)


@pytest.mark.parametrize('value', [[math.nan, math.inf], '12', [1.0], None])
def test_garbage_outputs_in_process(value, no_leftovers):
  s = system(_returns(value), isolate={'f': False})
  _check_failed(s, 2, max_wall_s=5.0)


def test_one_garbage_value_does_not_void_the_batch():
  s = system(_returns([math.nan, 1.0, None]), isolate={'f': False})
  _, per_function, stats = s(['p'] * 3, ['c'] * 3)
  np.testing.assert_array_equal(per_function['f'], [0.0, 1.0, np.nan])
  assert stats['f/failures'] == 1 and stats['f/applicable'] == pytest.approx(2 / 3)


def test_in_process_exception_is_caught():
  _check_failed(system(_raise, isolate={'f': False}), 3, max_wall_s=5.0)


def test_hang_on_one_item_keeps_the_others(no_leftovers):
  completions = ['ok', 'hang', 'ok', 'ok', 'ok']
  for n_workers in (1, 2):
    start = time.monotonic()
    total, per_function, stats = system(_hang_on_marked, n_workers)(['p'] * 5, completions)
    assert time.monotonic() - start < TIMEOUT_S + 3.0
    np.testing.assert_array_equal(per_function['f'], [1.0, 0.0, 1.0, 1.0, 1.0])
    assert stats['f/failures'] == 1


def test_crash_on_one_item_keeps_the_others(no_leftovers):
  completions = ['ok', 'die', 'ok', 'die', 'ok']
  _, per_function, stats = system(_exit_on_marked, 1)(['p'] * 5, completions)
  np.testing.assert_array_equal(per_function['f'], [0.5, 0.0, 0.5, 0.0, 0.5])
  assert stats['f/failures'] == 2


def test_memory_is_limited(no_leftovers):
  _check_failed(system(_memory_hog, memory_mb=256), 1, max_wall_s=10.0)


def test_batch_limit_cuts_the_rest(no_leftovers):
  s = system(_swallow_alarm, 1, batch_timeout_s=1.0)
  _check_failed(s, 10, max_wall_s=1.0 + 2.0)


def test_helper_processes_are_killed(tmp_path, no_leftovers):
  pid_file = tmp_path / 'pid'

  def starts_helper(prompts, completions, **unused):
    import subprocess
    helper = subprocess.Popen(['sleep', '1000'])
    pid_file.write_text(str(helper.pid))
    while True:
      try:
        time.sleep(1000)
      except BaseException:  # noqa: BLE001
        pass

  _check_failed(system(starts_helper, 1), 1, max_wall_s=TIMEOUT_S + GRACE_S + 2.0)
  helper = int(pid_file.read_text())
  deadline = time.monotonic() + 2.0
  while alive(helper) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not alive(helper)


def test_failures_are_logged_once_and_the_system_still_works(no_leftovers):
  s = rewards.RewardSystem({'bad': _raise, 'good': _returns([1.0])}, {'bad': 1.0, 'good': 1.0},
                           timeout_s=TIMEOUT_S, grace_s=GRACE_S)
  for _ in range(2):
    total, per_function, stats = s(['p'] * 3, ['c'] * 3)
    np.testing.assert_array_equal(total, [1.0] * 3)
    assert stats['bad/failures'] == 3 and stats['good/failures'] == 0
  assert s._logged == {('bad', 'exception')}


ADVERSARIAL = [
    '<answer>' + '1 ' * 500_000 + '</answer>',  # 1e6 characters
    'x' * 1_000_000,
    '<answer>' * 10_000 + '3' + '</answer>' * 10_000,
    '<think>' * 10_000 + '</think>' * 10_000 + '<answer>4</answer>',
    '\\boxed{' * 10_000 + '3',
    '\\boxed{' + '{' * 100_000 + '3',
    '<answer>9^9^9^9</answer>',
    '<answer>1e999999999</answer>',
    '<answer>' + '9' * 999 + '</answer>',
    '<tool_call>' + '[' * 100_000 + '</tool_call>',
    answer("import os\nos.system('rm -rf /')\nwhile True:\n    pass"),
]


def test_real_rewards_on_adversarial_completions(no_leftovers):
  s = rewards.default_reward_system({
      'functions': {'stem': 1.0, 'code': 1.0, 'agent': 1.0, 'format': 0.1, 'overlong': 0.1},
      'timeout_s': 5.0, 'max_new_tokens': 128, 'overlong_buffer': 16, 'code_timeout_s': 2.0})
  n = len(ADVERSARIAL)
  records = []
  for i in range(n):
    records += [math_record('3'), code_record(ADD_TESTS), AGENT_RECORD]
  completions = [c for c in ADVERSARIAL for _ in range(3)]
  start = time.monotonic()
  total, per_function, stats = s([''] * 3 * n, completions, records=records,
                                 truncated=[True] * 3 * n, lengths=[128] * 3 * n)
  assert time.monotonic() - start < 20.0
  assert stats['failures'] == 0
  for name in ('stem', 'code', 'agent'):
    values = per_function[name]
    assert np.all(np.isnan(values) | (values == 0.0)), (name, values)
  # Only the hostile program is well formed (and the sandbox scored it 0).
  np.testing.assert_array_equal(per_function['format'][:-3], 0.0)
  np.testing.assert_array_equal(per_function['format'][-3:], [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(per_function['overlong'], -1.0)


def test_sound_stem_probe_config_builds():
  from configs import rl_probe_sound_stem
  stage = rl_probe_sound_stem.get_config('tiny').stages[3]
  assert stage.name == 'rl_stem' and 'sound_stem' in stage.filter.functions
  system = rewards.default_reward_system(stage.rewards.to_dict())
  assert set(system.weights) == {'sound_stem', 'format', 'overlong'}
