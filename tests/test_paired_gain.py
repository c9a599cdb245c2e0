"""Paired comparison of two stages' per-item held-out scores."""

import json

import numpy as np
import pytest

from experiments import paired_gain
from pipeline import evaluate


def _items(scores: dict[str, float], task_of) -> dict[str, dict]:
  return {i: {'id': i, 'task': task_of(i), 'level': 0, 'score': s, 'completion': ''}
          for i, s in scores.items()}


def test_paired_gain_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 2, 200).astype(float), rng.integers(0, 2, 200).astype(float)
  r = paired_gain.paired(list(a), list(b))
  d = b - a
  np.testing.assert_allclose(r['gain'], d.mean())
  np.testing.assert_allclose(r['se'], d.std(ddof=1) / np.sqrt(len(d)))
  np.testing.assert_allclose(r['z'], d.mean() / (d.std(ddof=1) / np.sqrt(len(d))))
  assert (r['better'], r['worse']) == (int((d > 0).sum()), int((d < 0).sum()))
  assert (r['base'], r['after'], r['n']) == (a.mean(), b.mean(), 200)


def test_compare_groups_by_domain_and_task(tmp_path):
  task_of = lambda i: i.split('/')[0]
  a = _items({'gcd/0': 0.0, 'gcd/1': 1.0, 'chain_sum/0': 0.0, 'code_gen/0': 1.0,
              'tool_use/0': 0.0}, task_of)
  b = _items({'gcd/0': 1.0, 'gcd/1': 1.0, 'chain_sum/0': 1.0, 'code_gen/0': 0.0,
              'tool_use/0': 0.0}, task_of)
  result = paired_gain.compare(a, b)
  assert result['math']['n'] == 3 and result['math']['gain'] == pytest.approx(2 / 3)
  assert result['code']['gain'] == -1.0 and result['tool calls']['gain'] == 0.0
  assert result['gcd']['better'] == 1 and result['gcd']['worse'] == 0
  # written by the evaluator, read back the same
  path = tmp_path / 'items.jsonl'
  evaluate.write_items(str(path), list(a.values()), [x['score'] for x in a.values()],
                       ['c'] * len(a), [None] * len(a))
  assert {i: x['score'] for i, x in evaluate.read_items(str(path)).items()} == {
      i: x['score'] for i, x in a.items()}


def test_different_items_are_an_error(tmp_path):
  a = _items({'gcd/0': 0.0}, lambda i: 'gcd')
  b = _items({'gcd/1': 0.0}, lambda i: 'gcd')
  with pytest.raises(ValueError, match='different items'):
    paired_gain.compare(a, b)
  with pytest.raises(FileNotFoundError, match='rl_stem'):
    paired_gain.stage_items(str(tmp_path), 'rl_stem')


def test_command_line_writes_table_and_json(tmp_path, capsys):
  task_of = lambda i: 'gcd'
  for stage, scores in (('distill', [0.0, 0.0, 1.0]), ('rl_stem', [1.0, 0.0, 1.0])):
    (tmp_path / stage).mkdir()
    items = _items({f'gcd/{k}': s for k, s in enumerate(scores)}, task_of)
    evaluate.write_items(str(tmp_path / stage / 'eval_items.jsonl'), list(items.values()),
                         scores, [''] * 3, [s == 1.0 for s in scores])
  paired_gain.main([str(tmp_path), 'distill', 'rl_stem'])
  out = capsys.readouterr().out
  assert '| rl_stem | math | 3 | 0.333 | 0.667 | +0.333 |' in out
  assert '| rl_stem | math (sound) | 3 | 0.333 | 0.667 | +0.333 |' in out
  with open(tmp_path / 'paired_gain_distill.json') as f:
    assert json.load(f)['rl_stem']['gcd']['better'] == 1


def test_sampled_scores_compare_as_their_own_groups(tmp_path):
  """Items with `sampled` (avg@k, eval.samples) get `(avg@k)` groups next to
  the greedy ones; items without it (tool calls, chats) get none."""
  task_of = lambda i: i.split('/')[0]
  a = _items({'gcd/0': 0.0, 'gcd/1': 1.0, 'code_gen/0': 1.0, 'tool_use/0': 0.0}, task_of)
  b = _items({'gcd/0': 0.0, 'gcd/1': 1.0, 'code_gen/0': 1.0, 'tool_use/0': 0.0}, task_of)
  for items, sampled in ((a, (0.25, 0.5, 0.5)), (b, (0.5, 1.0, 0.25))):
    for key, value in zip(('gcd/0', 'gcd/1', 'code_gen/0'), sampled):
      items[key]['sampled'] = value
  result = paired_gain.compare(a, b)
  assert result['math']['gain'] == 0.0
  assert result['math (avg@k)']['n'] == 2
  assert result['math (avg@k)']['gain'] == pytest.approx((0.25 + 0.5) / 2)
  assert result['code (avg@k)']['gain'] == pytest.approx(-0.25)
  assert 'tool calls (avg@k)' not in result
  path = tmp_path / 'items.jsonl'
  evaluate.write_items(str(path), list(b.values()), [x['score'] for x in b.values()],
                       [''] * len(b), [None] * len(b), {'gcd/0': 0.5})
  read = evaluate.read_items(str(path))
  assert read['gcd/0']['sampled'] == 0.5 and read['gcd/1']['sampled'] is None
