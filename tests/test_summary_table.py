"""The README's results table from a run's summary.json and histories."""

import json

from experiments import summary_table


def test_table_rows_and_reward_trend(tmp_path):
  (tmp_path / 'rl').mkdir()
  rewards = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
  (tmp_path / 'rl' / 'history.json').write_text(json.dumps(
      [{'step': i, 'reward_mean': r} for i, r in enumerate(rewards)] + [{'step': 10}]))
  summary = {
      'untrained': {'model': 'teacher', 'eval': {'accuracy': 0.0}},
      'stages': [
          {'name': 'sft', 'kind': 'sft', 'status': 'done', 'wall_s': 12.0,
           'eval': {'accuracy': 0.25, 'perplexity/chat': 1234.5}},
          {'name': 'rl', 'kind': 'grpo', 'status': 'done', 'wall_s': 3.0,
           'eval': {'accuracy': 0.5, 'filter/kept': 7, 'filter/candidates': 64}},
          {'name': 'later', 'kind': 'grpo', 'status': 'pending', 'wall_s': 0.0, 'eval': {}},
      ]}
  lines = summary_table.table(summary, str(tmp_path)).splitlines()
  assert len(lines) == 2 + 3  # header, rule, untrained, two finished stages
  assert lines[3].startswith('| sft | sft | 0.250 |') and '1,234' in lines[3]
  assert 'train reward 0.30 -> 0.80 (first/last 5 logs)' in lines[4]
  assert 'filter kept 7/64' in lines[4]


def test_sampled_columns_only_when_a_stage_has_them():
  stage = lambda name, ev: {'name': name, 'kind': 'grpo', 'status': 'done', 'wall_s': 1.0,
                            'eval': ev}
  plain = summary_table.table({'stages': [stage('a', {'accuracy': 0.5})]})
  assert 'avg@' not in plain
  lines = summary_table.table({'stages': [
      stage('a', {'accuracy': 0.5}),
      stage('b', {'accuracy': 0.5, 'sampled/accuracy': 0.25, 'sampled/pass@1/code_gen': 0.75,
                  'sampled/k': 8, 'sampled/temperature': 0.5})],
  }).splitlines()
  assert lines[0].endswith('| math avg@8 T=0.5 | code avg@8 T=0.5 | wall s | notes |')
  assert lines[2].endswith('| - | - | 1 |  |') and lines[3].endswith('| 0.250 | 0.750 | 1 |  |')
