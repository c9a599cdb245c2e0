"""A run's summary.json as the README's markdown table.

  python -m experiments.summary_table runs/default
"""

from __future__ import annotations

import json
import os
import sys

COLUMNS = (
    ('accuracy', 'math acc'), ('sound_accuracy', 'sound math'),
    ('accuracy/basic_arithmetic', 'arith'),
    ('accuracy/chain_sum', 'chain sum'), ('accuracy/gcd', 'gcd'),
    ('pass@1/code_gen', 'code pass@1'), ('pass@1/humaneval', 'HumanEval'),
    ('call_accuracy/agent', 'BFCL calls'), ('call_accuracy/tool_use', 'tool calls'),
    ('perplexity/chat', 'chat ppl'),
)
# Where stages set eval.samples = k: avg@k of completions sampled at
# eval.temperature (pass@1 as the report and RL measure it); the header
# names k and T.
SAMPLED_COLUMNS = (('sampled/accuracy', 'math avg@{k} T={t}'),
                   ('sampled/pass@1/code_gen', 'code avg@{k} T={t}'))


def reward_trend(workdir: str, stage: str, window: int = 5) -> tuple[float, float] | None:
  """Mean training reward over the first and the last `window` logged steps
  (single steps are too noisy: each samples different prompts)."""
  path = os.path.join(workdir, stage, 'history.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    rewards = [row['reward_mean'] for row in json.load(f) if 'reward_mean' in row]
  if not rewards:
    return None
  mean = lambda xs: sum(xs) / len(xs)
  return mean(rewards[:window]), mean(rewards[-window:])


def table(summary: dict, workdir: str | None = None) -> str:
  fmt = lambda v: '-' if v is None else (f'{v:.3f}' if v < 100 else f'{v:,.0f}')
  rows = []
  if summary.get('untrained'):
    rows.append(('untrained', f"init ({summary['untrained']['model']})",
                 summary['untrained']['eval'], 0.0))
  for stage in summary['stages']:
    if stage['status'] == 'done':
      rows.append((stage['name'], stage['kind'], stage['eval'], stage['wall_s']))
  sampled = next(((ev['sampled/k'], ev['sampled/temperature']) for *_, ev, _ in rows
                  if 'sampled/k' in ev), None)
  columns = COLUMNS + tuple((key, label.format(k=sampled[0], t=sampled[1]))
                            for key, label in SAMPLED_COLUMNS if sampled)
  head = '| stage | kind | ' + ' | '.join(c[1] for c in columns) + ' | wall s | notes |'
  lines = [head, '|' + '---|' * (len(columns) + 4)]
  for name, kind, ev, wall in rows:
    notes = []
    if 'size_ratio' in ev:
      notes.append(f"student/teacher params {ev['size_ratio']:.2f}, "
                   f"sampling {ev['speedup']:.1f}x faster")
    trend = reward_trend(workdir, name) if workdir else None
    if trend:
      notes.append(f"train reward {trend[0]:.2f} -> {trend[1]:.2f} (first/last 5 logs)")
    elif 'train_reward_first' in ev:
      notes.append(f"train reward {ev['train_reward_first']:.2f} -> {ev['train_reward_last']:.2f}")
    if 'pairwise_accuracy' in ev:
      notes.append(f"held-out pairwise acc {ev['pairwise_accuracy']:.3f} "
                   f"(verifiable {ev.get('pairwise_accuracy/verifiable', float('nan')):.3f}, "
                   f"chat {ev.get('pairwise_accuracy/chat', float('nan')):.3f})")
    if 'filter/kept' in ev:
      notes.append(f"filter kept {ev['filter/kept']}/{ev['filter/candidates']}")
    lines.append(f'| {name} | {kind} | ' + ' | '.join(fmt(ev.get(c)) for c, _ in columns) +
                 f' | {wall:.0f} | {"; ".join(notes)} |')
  return '\n'.join(lines) + '\n'


def main() -> None:
  workdir = sys.argv[1] if len(sys.argv) > 1 else 'runs/default'
  with open(os.path.join(workdir, 'summary.json')) as f:
    print(table(json.load(f), workdir))


if __name__ == '__main__':
  main()
