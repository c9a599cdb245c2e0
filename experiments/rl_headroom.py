"""What can RL at temperature T reach? Greedy against sampled accuracy.

  python -m experiments.rl_headroom runs/default distill --temperatures=1.0,0.5 --k=8

GRPO maximises the expected reward of completions sampled at its rollout
temperature T, while the held-out suite scores one greedy completion. For
each held-out item of the run's math and code tasks this samples k
completions at each T, scores them with the suite's own scorer
(`evaluate.score_completions`) and prints, per task and level:

  greedy   the stage's held-out score (its eval_items.jsonl)
  avg@k    mean score of the samples: what RL at T maximises
  pass@k   share of items with a right sample among k: what RL can reach

On the default run's distilled student avg@8 at T = 1 was half of greedy
(chain sums, level 2: 0.01 against 0.30): rollouts at T = 1 are mostly
off the path greedy decoding takes, and RL there trains that path little.
Writes the table as JSON to <workdir>/<stage>/rl_headroom.json.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from absl import app, flags

from pipeline import evaluate, runner

_K = flags.DEFINE_integer('k', 8, 'Samples per item and temperature.')
_TEMPERATURES = flags.DEFINE_list('temperatures', ['1.0', '0.5'], 'Sampling temperatures T.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def headroom(records: list[dict], greedy: dict[str, float],
             sampled: dict[float, np.ndarray]) -> dict[str, dict]:
  """{'task/Llevel': {n, greedy, T: {avg, pass}}} plus an 'all' row."""
  by_group = collections.defaultdict(list)
  for i, r in enumerate(records):
    by_group[r['task'] if r.get('level') is None else f"{r['task']}/L{r['level']}"].append(i)
  groups = {**dict(sorted(by_group.items())), 'all': list(range(len(records)))}
  table = {}
  for name, idx in groups.items():
    row = {'n': len(idx), 'greedy': float(np.mean([greedy[records[i]['id']] for i in idx]))}
    for t, scores in sampled.items():
      row[str(t)] = {'avg': float(scores[idx].mean()),
                     'pass': float((scores[idx] >= 1.0).any(axis=1).mean())}
    table[name] = row
  return table


def markdown(table: dict[str, dict], temperatures: list[float], k: int) -> str:
  head = ['group', 'n', 'greedy'] + [f'{m}@{k} T={t}' for t in temperatures for m in ('avg', 'pass')]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for name, row in table.items():
    cells = [name, str(row['n']), f"{row['greedy']:.3f}"]
    cells += [f"{row[str(t)][m]:.3f}" for t in temperatures for m in ('avg', 'pass')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) != 3:
    raise app.UsageError('usage: python -m experiments.rl_headroom WORKDIR STAGE [--k=8] '
                         '[--temperatures=1.0,0.5]')
  workdir, stage = argv[1:]
  config, tokenizer, spec, params = runner.load_policy(workdir, stage)
  items_path = os.path.join(workdir, stage, 'eval_items.jsonl')
  if not os.path.exists(items_path):
    raise FileNotFoundError(f'{items_path}: run the stage (its held-out evaluation) first')
  greedy = {i['id']: i['score'] for i in map(json.loads, open(items_path))}
  _, eval_records = runner.run_data(config)
  records = [r for r in eval_records if evaluate.is_verifiable(r)]
  max_new_tokens = {s.name: s for s in config.stages}[stage].eval.max_new_tokens
  temperatures = [float(t) for t in _TEMPERATURES.value]
  sampled = {t: evaluate.sample_scores(spec, params, tokenizer, records, k=_K.value,
                                       temperature=t, max_new_tokens=max_new_tokens,
                                       batch_size=128, seed=_SEED.value)
             for t in temperatures}
  table = headroom(records, greedy, sampled)
  print(markdown(table, temperatures, _K.value))
  out = os.path.join(workdir, stage, 'rl_headroom.json')
  with open(out, 'w') as f:
    json.dump({'k': _K.value, 'temperatures': temperatures, 'table': table}, f, indent=1)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  app.run(main)
