"""Did a stage change held-out accuracy, beyond the noise of the items drawn?

  python -m experiments.paired_gain runs/default distill rl_stem rl_code

Compares each later stage with the first one on the same held-out items
(`<stage>/eval_items.jsonl`; `untrained` is the baseline), per domain: math
(the reasoning-gym tasks), code (generated tasks + HumanEval), tool calls
(BFCL + procedural), and per task; `math (sound)` scores a math item 1 only
when its reasoning holds up too (`sound` in the items file). Paired, because
both stages answered the same items: the gain's standard error is
sd(score_b - score_a) / sqrt(n), and `better` / `worse` count the items that
changed; the `(avg@k)` groups compare the mean score of k completions per
item sampled at eval.temperature, where both stages set eval.samples. |z| >= 2 is a change
that item-sampling noise rarely produces (about 1 time in 20).
Prints a markdown table and writes it as JSON next to the run's summary.
"""

from __future__ import annotations

import json
import math
import os
import sys

from pipeline import evaluate, loop

DOMAINS = {
    'math': lambda task: task not in evaluate.CODE_TASKS + evaluate.AGENT_TASKS,
    'code': lambda task: task in evaluate.CODE_TASKS,
    'tool calls': lambda task: task in evaluate.AGENT_TASKS,
}


def paired(base: list[float], other: list[float]) -> dict:
  """Mean gain of `other` over `base` (same items, same order) with its paired SE."""
  n = len(base)
  diffs = [b - a for a, b in zip(base, other)]
  gain = sum(diffs) / n
  var = sum((d - gain) ** 2 for d in diffs) / max(n - 1, 1)
  se = math.sqrt(var / n)
  return {'n': n, 'base': sum(base) / n, 'after': sum(other) / n, 'gain': gain, 'se': se,
          'z': gain / se if se > 0 else 0.0, 'better': sum(d > 0 for d in diffs),
          'worse': sum(d < 0 for d in diffs)}


def compare(items_a: dict[str, dict], items_b: dict[str, dict]) -> dict[str, dict]:
  """{group: paired(...)} for each domain and task the two evaluations share."""
  if set(items_a) != set(items_b):
    raise ValueError(f'the two evaluations scored different items '
                     f'({len(set(items_a) ^ set(items_b))} not in both): not comparable')
  ids = sorted(items_a)
  groups = {name: [i for i in ids if keep(items_a[i]['task'])] for name, keep in DOMAINS.items()}
  for task in sorted({items_a[i]['task'] for i in ids}):
    groups[task] = [i for i in ids if items_a[i]['task'] == task]
  out = {name: paired([items_a[i]['score'] for i in group], [items_b[i]['score'] for i in group])
         for name, group in groups.items() if group}
  sound = [i for i in groups['math'] if items_a[i].get('sound') is not None
           and items_b[i].get('sound') is not None]
  if sound:
    out['math (sound)'] = paired([float(items_a[i]['sound']) for i in sound],
                                 [float(items_b[i]['sound']) for i in sound])
  for name, group in groups.items():
    sampled = [i for i in group if items_a[i].get('sampled') is not None
               and items_b[i].get('sampled') is not None]
    if sampled:
      out[f'{name} (avg@k)'] = paired([items_a[i]['sampled'] for i in sampled],
                                      [items_b[i]['sampled'] for i in sampled])
  return out


def stage_items(workdir: str, stage: str) -> dict[str, dict]:
  path = os.path.join(workdir, stage, loop.EVAL_ITEMS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no per-item evaluation (has stage {stage!r} run, '
                            f'with this version of the code?)')
  return evaluate.read_items(path)


def table(base: str, results: dict[str, dict[str, dict]]) -> str:
  lines = [f'| stage vs {base} | group | n | before | after | gain | ± se | z | better | worse |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for stage, groups in results.items():
    for group, r in groups.items():
      lines.append(f"| {stage} | {group} | {r['n']} | {r['base']:.3f} | {r['after']:.3f} | "
                   f"{r['gain']:+.3f} | {r['se']:.3f} | {r['z']:+.1f} | {r['better']} | "
                   f"{r['worse']} |")
  return '\n'.join(lines)


def main(argv: list[str]) -> None:
  if len(argv) < 3:
    raise SystemExit('usage: python -m experiments.paired_gain WORKDIR BASE_STAGE STAGE '
                     '[STAGE ...]')
  workdir, base, *stages = argv
  items = stage_items(workdir, base)
  results = {stage: compare(items, stage_items(workdir, stage)) for stage in stages}
  print(table(base, results))
  out = os.path.join(workdir, f'paired_gain_{base}.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  main(sys.argv[1:])
