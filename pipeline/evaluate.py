"""Held-out evaluation of one model, per domain.

- math / STEM (reasoning-gym tasks): greedy answer scored by the task's scorer
  -> `accuracy/<task>`, and `accuracy` over all of them; `sound_accuracy`
  (and per task) counts only right answers whose reasoning makes arithmetic
  claims and no false one (`reasoning_gym_math.sound`): 1 or 2 is the gcd of
  60% of the items, whatever the trace computed;
- code (generated tasks, HumanEval): the extracted program run against the
  task's tests in the sandbox -> `pass@1/<task>`;
- agent (BFCL, and generated tool-use tasks): tool calls match an accepted
  answer -> `call_accuracy/agent`, `call_accuracy/tool_use`;
- conversation: teacher-forced perplexity of the assistant turns -> `perplexity/chat`;
- with `eval.samples` = k > 0, also pass@1 as the report and RL measure it:
  the mean score of k completions per math and code item sampled at
  `eval.temperature` (avg@k) -> `sampled/accuracy`, `sampled/pass@1/<task>`, ...
"""

from __future__ import annotations

import collections
import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data.chat import render_chat, render_prompt
from data.sources import agent, code_tasks, reasoning_gym_math
from losses.ce import masked_cross_entropy
from pipeline import sampling, sandbox
from pipeline import state as state_lib
from pipeline.stage_data import eval_input

CODE_TASKS = ('code_gen', 'humaneval')
AGENT_TASKS = ('agent', 'tool_use')  # records scored by agent.score_calls


def generate_answers(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict],
                     *, max_new_tokens: int, batch_size: int, seed: int = 0,
                     temperature: float = 0.0) -> list[str]:
  """Completions (decoded text, end token stripped) of each record's prompt:
  greedy, or sampled at `temperature`."""
  prompts = [render_prompt(eval_input(r), tokenizer) for r in records]
  samples = sampling.generate(
      spec, params, prompts,
      sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature),
      rng=jax.random.key(seed), end_id=tokenizer.end_id, pad_id=tokenizer.pad_id,
      batch_size=batch_size)
  return decode_all(samples, tokenizer)


def decode_all(samples: sampling.Samples, tokenizer) -> list[str]:
  """Each row's generated text, the end token stripped."""
  return [tokenizer.decode([t for t in row[:n] if t != tokenizer.end_id])
          for row, n in zip(samples.tokens.tolist(), samples.lengths)]


def sample_scores(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict], *,
                  k: int, temperature: float, max_new_tokens: int, batch_size: int,
                  seed: int = 0) -> np.ndarray:
  """[N, k] the suite's scores of k completions per record sampled at `temperature`."""
  repeated = [r for r in records for _ in range(k)]
  completions = generate_answers(spec, params, tokenizer, repeated,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 seed=seed, temperature=temperature)
  scores = score_completions(repeated, completions)
  return np.asarray(scores, np.float32).reshape(len(records), k)


def code_pass(records: Sequence[dict], completions: Sequence[str]) -> list[float]:
  """1.0 where the extracted program passes all of the task's tests in the sandbox."""
  jobs = [(code_tasks.extract_code(c) or '', r['tests']) for r, c in zip(records, completions)]
  results = sandbox.run_many(jobs, max_workers=2, timeout_s=5.0)
  return [float(res.status == 'passed') for res in results]


def score_completions(records: Sequence[dict], completions: Sequence[str]) -> list[float]:
  """Per-record score in [0, 1], by the record's task."""
  scores = [0.0] * len(records)
  code_idx = [i for i, r in enumerate(records) if r['task'] in CODE_TASKS]
  for i, s in zip(code_idx, code_pass([records[i] for i in code_idx],
                                      [completions[i] for i in code_idx])):
    scores[i] = s
  for i, (record, completion) in enumerate(zip(records, completions)):
    if record['task'] in AGENT_TASKS:
      scores[i] = agent.score_calls(record, completion)
    elif record['task'] not in CODE_TASKS:
      scores[i] = reasoning_gym_math.score(record, completion)
  return scores


def metric_name(task: str) -> str:
  if task in CODE_TASKS:
    return f'pass@1/{task}'
  if task in AGENT_TASKS:
    return f'call_accuracy/{task}'
  return f'accuracy/{task}'


def is_math(record: dict) -> bool:
  return record['task'] not in CODE_TASKS + AGENT_TASKS + ('chat',)


def is_verifiable(record: dict) -> bool:
  """Math and code items: scored by a checker, so sampled completions can be
  scored too (eval.samples, experiments/rl_headroom.py)."""
  return is_math(record) or record['task'] in CODE_TASKS


def sound_flags(records: Sequence[dict], completions: Sequence[str]) -> list[bool | None]:
  """`reasoning_gym_math.sound` for math records, None for the others."""
  return [reasoning_gym_math.sound(r, c) if is_math(r) else None
          for r, c in zip(records, completions)]


def summarize(records: Sequence[dict], scores: Sequence[float],
              sound: Sequence[bool | None] | None = None) -> dict[str, float]:
  """Mean score per task, plus `accuracy` over the reasoning-gym tasks; with
  `sound` (sound_flags), `sound_accuracy` overall and per math task."""
  per_task = collections.defaultdict(list)
  for record, score in zip(records, scores):
    per_task[record['task']].append(score)
  metrics = {metric_name(t): float(np.mean(s)) for t, s in sorted(per_task.items())}
  math = [s for t, v in per_task.items() if t not in CODE_TASKS + AGENT_TASKS for s in v]
  if math:
    metrics['accuracy'] = float(np.mean(math))
  if sound is not None and math:
    per_task = collections.defaultdict(list)
    for record, flag in zip(records, sound):
      if flag is not None:
        per_task[record['task']].append(flag)
    metrics.update({f'sound_accuracy/{t}': float(np.mean(f)) for t, f in sorted(per_task.items())})
    metrics['sound_accuracy'] = float(np.mean([f for v in per_task.values() for f in v]))
  return metrics


@functools.partial(jax.jit, static_argnames='spec')
def _nll_sums(params, batch, spec):
  model = state_lib.merge(spec, params)
  logits = model(batch['inputs'], batch['positions']).logits
  _, sums = masked_cross_entropy(logits, batch['targets'], batch['loss_mask'], normalizer=1.0)
  return sums['loss_sum'], sums['num_tokens']


def perplexity(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict], *,
               batch_size: int, max_len: int) -> float:
  """exp(mean NLL) over the assistant tokens of held-out chats (teacher-forced)."""
  rows = []
  for r in records:
    ids, mask = render_chat(r['messages'], tokenizer, record_id=r['id'])
    rows.append((ids[:max_len + 1], mask[:max_len + 1]))
  length = sampling.bucket(max(len(ids) for ids, _ in rows) - 1)
  total_nll = total_tokens = 0.0
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    batch = {k: np.zeros((batch_size, length), np.int32) for k in ('inputs', 'targets')}
    batch['loss_mask'] = np.zeros((batch_size, length), np.float32)
    for i, (ids, mask) in enumerate(chunk):
      n = len(ids) - 1
      batch['inputs'][i, :n], batch['targets'][i, :n] = ids[:-1], ids[1:]
      batch['loss_mask'][i, :n] = mask[1:]
    batch['positions'] = np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length))
    nll, tokens = _nll_sums(params, batch, spec)
    total_nll, total_tokens = total_nll + float(nll), total_tokens + float(tokens)
  return float(np.exp(total_nll / max(total_tokens, 1.0)))


def write_items(path: str, records: Sequence[dict], scores: Sequence[float],
                completions: Sequence[str], sound: Sequence[bool | None],
                sampled: dict[str, float] | None = None) -> None:
  """One JSON line per scored item: what paired comparisons of two stages
  (experiments/paired_gain.py) and a reader of the completions need.
  sampled: {id: avg@k} of the items that were also sampled."""
  sampled = sampled or {}
  with open(path, 'w') as f:
    for record, score, completion, flag in zip(records, scores, completions, sound):
      f.write(json.dumps({'id': record['id'], 'task': record['task'],
                          'level': record.get('level'), 'score': score, 'sound': flag,
                          'sampled': sampled.get(record['id']),
                          'completion': completion}) + '\n')


def read_items(path: str) -> dict[str, dict]:
  """write_items' file as {id: item}."""
  with open(path) as f:
    return {item['id']: item for item in map(json.loads, f)}


def evaluate(spec: state_lib.ModelSpec, params, tokenizer, records: Sequence[dict], cfg,
             *, seed: int = 0, items_path: str | None = None) -> dict[str, float]:
  """Held-out metrics of one model on a stage's eval records.

  cfg: the stage's `eval` config (max_new_tokens, batch_size, max_chat_len;
  samples and temperature: avg@k of sampled completions, off at samples 0).
  items_path: where to write the per-item scores and completions (write_items).
  """
  chats = [r for r in records if r['task'] == 'chat']
  generated = [r for r in records if r['task'] != 'chat']
  metrics = {}
  if generated:
    completions = generate_answers(spec, params, tokenizer, generated,
                                   max_new_tokens=cfg.max_new_tokens,
                                   batch_size=cfg.batch_size, seed=seed)
    scores = score_completions(generated, completions)
    sound = sound_flags(generated, completions)
    metrics.update(summarize(generated, scores, sound))
    sampled = {}
    verifiable = [r for r in generated if is_verifiable(r)]
    if cfg.get('samples', 0) and verifiable:
      per_item = sample_scores(spec, params, tokenizer, verifiable, k=cfg.samples,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                               batch_size=cfg.batch_size, seed=seed).mean(axis=1)
      sampled = {r['id']: float(s) for r, s in zip(verifiable, per_item)}
      metrics.update({f'sampled/{k}': v for k, v in summarize(verifiable, per_item).items()})
      metrics.update({'sampled/k': cfg.samples, 'sampled/temperature': cfg.temperature})
    if items_path:
      write_items(items_path, generated, scores, completions, sound, sampled)
  if chats:
    metrics['perplexity/chat'] = perplexity(spec, params, tokenizer, chats,
                                            batch_size=cfg.batch_size, max_len=cfg.max_chat_len)
  metrics['num_eval'] = len(records)
  return metrics


def periodic_eval_fn(spec: state_lib.ModelSpec, tokenizer, records: Sequence[dict], cfg, *,
                     seed: int = 0):
  """state -> metrics on a fixed, evenly spaced subset of the held-out suite
  (cfg.during_training records; chats excluded to keep it cheap)."""
  pool = [r for r in records if r['task'] != 'chat']
  n = cfg.during_training
  if not n or not pool:
    return None
  subset = pool[::max(1, len(pool) // n)][:n]
  return lambda state: evaluate(spec, state['params'], tokenizer, subset, cfg, seed=seed)
