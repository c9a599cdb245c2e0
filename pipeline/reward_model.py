"""Reward model: the LM backbone plus a scalar head, trained with Bradley-Terry.

r(x, y) = w · norm(h_L)[last] + b: the last block's residual stream passed
through the model's own final RMSNorm (`Output.hidden[-1]` is taken *before*
that norm, so we apply it: the head then reads the same normalised features
the LM head reads), at the last real token of prompt + response, which is the
response's `<|end|>`. The backbone starts from `ctx.init_params_path`
(normally the policy's latest params) or random; the head (w [D], b []) is a
stage extra, trained with the backbone and saved with it:
`final/` holds {'params': backbone, 'head': {'w', 'b'}}.

Preference pairs are derived from real data; nobody labelled these pairs as
pairs (DESIGN.md §7):

  chat        chitchat conversations carry their participants' ratings of the
              whole conversation (`rating`, the mean of witty / upbeat /
              interesting). Conversations are grouped by `topic` (the
              conversation starter chitchat showed both participants), and each
              rated conversation is paired with up to `pairs.per_record`
              random others of its topic whose rating differs by at least
              `pairs.min_rating_gap` (Δ); y⁺ is the higher-rated one. Each side
              is its own conversation: prompt = every message before the final
              assistant turn, response = that final assistant turn, so
              x⁺ ≠ x⁻. What this teaches is "a better conversation on this
              topic", not "a better reply to this context": the ratings score
              the whole exchange, users' turns included, and nothing pairs two
              replies to one context. Unrated conversations (chatterbot, ~8% of
              chitchat), the few without a topic, and conversations with no
              partner at gap Δ make no pairs (each counted in the stats).
  verifiable  reasoning-gym records: y⁺ = the reference response
              (`<think>trace</think><answer>a</answer>`, checked to score 1 by
              the task's scorer), y⁻ = the same response with only the answer
              changed: an integer answer moved by ±1..9 without crossing zero
              (so a sign is never the giveaway), any other answer replaced by
              another record's answer to the same task; kept only when the
              task's scorer gives y⁻ 0. Because the trace is left as it is, y⁻
              contradicts its own worked steps: the RM must check the answer
              against the trace (or, where a task has no trace, against the
              question) rather than learn a style difference.

Train pairs come from the sources' train splits, eval pairs from their eval
splits, which `stage_data.load` keeps disjoint; chat pairs never cross splits.
Sequences longer than `seq_len` are cut from the left (the response end, which
the head reads, is always kept) and counted.

Held-out metrics: `pairwise_accuracy` (r⁺ > r⁻) overall and per kind, counts,
the BT loss, and the mean and std of r over the held-out responses; the last
two are saved to `reward_model.json` for `preference_reward`'s
standardisation.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from data.chat import render_prompt
from data.sources import reasoning_gym_math
from losses.reward_model import bradley_terry_loss, scalar_head_rewards
from pipeline import checkpoint, loop, sampling, sharding, stage_data
from pipeline import state as state_lib
from pipeline.optim import make_optimizer
from pipeline.sft import check_batch_config

KINDS = ('verifiable', 'chat')  # pair kind -> its index in the `kind` column
SUPPORTED_SOURCES = ('chat', 'reasoning_gym')
INFO_FILE = 'reward_model.json'
_ANSWER_RE = re.compile(r'<answer>(.*?)</answer>\s*$', re.S)

# ----------------------------------------------------------------- pairs ---


@dataclasses.dataclass(frozen=True)
class PairText:
  """One preference pair as text: each side is (prompt messages, response)."""
  kind: str  # one of KINDS
  chosen_prompt: list  # messages before y⁺
  chosen: str  # y⁺
  rejected_prompt: list
  rejected: str  # y⁻
  ids: tuple  # (chosen record id, rejected record id)


def chat_pairs(records: Sequence[dict], *, min_rating_gap: float, per_record: int,
               seed: int) -> tuple[list[PairText], dict]:
  """Pairs of same-topic chitchat conversations whose ratings differ by ≥ Δ."""
  groups = collections.defaultdict(list)
  unrated = no_topic = 0
  for r in records:
    if r.get('rating') is None:
      unrated += 1
    elif not r.get('topic'):
      no_topic += 1
    else:
      groups[r['topic']].append(r)
  rng = np.random.default_rng(seed)
  pairs, seen, lonely = [], set(), 0
  for topic in sorted(groups):
    group = groups[topic]
    for r in group:
      partners = [o for o in group
                  if o is not r and abs(o['rating'] - r['rating']) >= min_rating_gap]
      if not partners:
        lonely += 1
        continue
      for j in rng.choice(len(partners), size=min(per_record, len(partners)), replace=False):
        o = partners[j]
        key = frozenset((r['id'], o['id']))
        if key in seen:
          continue
        seen.add(key)
        hi, lo = (r, o) if r['rating'] > o['rating'] else (o, r)
        pairs.append(PairText('chat', hi['messages'][:-1], hi['messages'][-1]['content'],
                              lo['messages'][:-1], lo['messages'][-1]['content'],
                              (hi['id'], lo['id'])))
  return pairs, {'chat': len(pairs), 'chat_unrated': unrated, 'chat_no_topic': no_topic,
                 'chat_no_partner': lonely}


def wrong_answer(answer: str, rng: np.random.Generator, others: Sequence[str]) -> str | None:
  """An answer that is wrong but looks like a right one.

  Integers move by ±1..9 without crossing zero (a non-negative answer stays
  non-negative); anything else becomes a different answer of the same task.
  """
  try:
    value = int(answer.strip())
  except ValueError:
    candidates = [o for o in others if o.strip() != answer.strip()]
    return candidates[rng.integers(len(candidates))] if candidates else None
  delta = int(rng.integers(1, 10)) * int(rng.choice([-1, 1]))
  if (value + delta < 0) != (value < 0):
    delta = -delta
  return str(value + delta)


def verifiable_pairs(records: Sequence[dict], *, seed: int) -> tuple[list[PairText], dict]:
  """(reference response, the same response with a wrong final answer) pairs."""
  rng = np.random.default_rng(seed)
  answers = collections.defaultdict(list)
  for r in records:
    answers[r['task']].append(r['answer'])
  pairs, skipped = [], 0
  for r in records:
    prompt = stage_data.eval_input(r)
    chosen = next(m['content'] for m in r['messages'] if m['role'] == 'assistant')
    match = _ANSWER_RE.search(chosen)
    wrong = wrong_answer(r['answer'], rng, answers[r['task']])
    if match is None or wrong is None:
      skipped += 1
      continue
    rejected = chosen[:match.start(1)] + wrong + chosen[match.end(1):]
    # The task's own scorer is the judge of both sides, not our perturbation.
    if (reasoning_gym_math.score(r, chosen) < 1.0
        or reasoning_gym_math.score(r, rejected) > 0.0):
      skipped += 1
      continue
    pairs.append(PairText('verifiable', prompt, chosen, prompt, rejected, (r['id'], r['id'])))
  return pairs, {'verifiable': len(pairs), 'verifiable_skipped': skipped}


def pair_texts(records: Sequence[dict], pairs_cfg, *, seed: int) -> tuple[list[PairText], dict]:
  """All pairs of one split: chat records by rating, reasoning-gym records by answer."""
  chat = [r for r in records if r['task'] == 'chat']
  gym = [r for r in records if r['task'] != 'chat']
  unsupported = sorted({r['task'] for r in gym if 'entry' not in r})
  if unsupported:
    raise ValueError(f'reward_model pairs come from chat and reasoning_gym records; got '
                     f'records of tasks {unsupported}: drop those sources from data.sources')
  c_pairs, c_stats = chat_pairs(chat, min_rating_gap=pairs_cfg.min_rating_gap,
                                per_record=pairs_cfg.per_record, seed=seed)
  v_pairs, v_stats = verifiable_pairs(gym, seed=seed)
  return c_pairs + v_pairs, {**c_stats, **v_stats}


def encode(prompt: Sequence[dict], response: str, tokenizer) -> np.ndarray:
  """prompt + response + <|end|>: exactly what render_chat gives the full chat."""
  return np.concatenate([render_prompt(prompt, tokenizer),
                         np.asarray(tokenizer.encode(response) + [tokenizer.end_id], np.int32)])


def rows(ids_list: Sequence[np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded rows {'inputs', 'positions' [N, T], 'last_index' [N]}; a
  sequence longer than T keeps its last T tokens (the end the head reads)."""
  n = len(ids_list)
  inputs = np.full((n, length), pad_id, np.int32)
  last = np.zeros((n,), np.int32)
  for i, ids in enumerate(ids_list):
    ids = ids[-length:]
    inputs[i, :len(ids)] = ids
    last[i] = len(ids) - 1
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (n, length)).copy()
  return {'inputs': inputs, 'positions': positions, 'last_index': last}


@dataclasses.dataclass
class Pairs:
  """Tokenised pairs: `chosen_*`, `rejected_*` ([N, T] inputs and positions,
  [N] last_index) and `kind` [N] (index into KINDS)."""
  arrays: dict[str, np.ndarray]
  stats: dict[str, float]
  texts: list[PairText]

  def __len__(self):
    return len(self.arrays['kind'])

  def take(self, step: int, count: int, seed: int) -> dict[str, np.ndarray]:
    """The `count` pairs of a step: a deterministic function of the step (a
    fresh permutation per epoch), so a resumed run replays the same pairs."""
    position = step * count + np.arange(count)
    epoch, index = np.divmod(position, len(self))
    idx = np.empty((count,), np.int64)
    for e in np.unique(epoch):
      on = epoch == e
      idx[on] = np.random.default_rng([seed, int(e)]).permutation(len(self))[index[on]]
    return {k: v[idx] for k, v in self.arrays.items()}


def tokenize_pairs(texts: list[PairText], stats: dict, tokenizer, seq_len: int) -> Pairs:
  arrays, truncated = {}, 0
  for side in ('chosen', 'rejected'):
    ids = [encode(getattr(p, f'{side}_prompt'), getattr(p, side), tokenizer) for p in texts]
    truncated += sum(len(x) > seq_len for x in ids)
    arrays.update({f'{side}_{k}': v for k, v in rows(ids, seq_len, tokenizer.pad_id).items()})
  arrays['kind'] = np.asarray([KINDS.index(p.kind) for p in texts], np.int32)
  return Pairs(arrays, {**stats, 'truncated_sides': truncated}, texts)


class PairIterator:
  """The train loop's data iterator: its state is the step, so resuming
  replays exactly; it yields this process's rows of the global batch."""

  def __init__(self, pairs: Pairs, batch_size: int, seed: int):
    self.pairs, self.batch_size, self.seed, self.step = pairs, batch_size, seed, 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.pairs.take(self.step, self.batch_size, self.seed)
    self.step += 1
    local = self.batch_size // jax.process_count()
    start = jax.process_index() * local
    return {k: v[start:start + local] for k, v in batch.items()}

  def get_state(self) -> dict:
    return {'step': self.step}

  def set_state(self, state: dict) -> None:
    self.step = state['step']


# ------------------------------------------------------------ the model ---


def init_head(d_model: int, seed: int) -> dict:
  """w ~ N(0, 1/D): r starts at O(1) on the unit-RMS normalised features.

  b is kept for the head's usual form, but BT only sees r⁺ - r⁻, where b
  cancels: it gets no gradient and stays 0 (the offset is fixed afterwards by
  standardising with held-out stats, see `preference_reward`).
  """
  w = jax.random.normal(jax.random.key(seed), (d_model,), jnp.float32) * d_model ** -0.5
  return {'w': w, 'b': jnp.zeros((), jnp.float32)}


def rewards(params, head, inputs_bt, positions_bt, last_index_b, *, spec):
  """r(x, y) [B] of right-padded rows, read at `last_index_b`."""
  t = inputs_bt.shape[1]
  # Padding is its own segment 0: no real token attends to it (causal anyway).
  segment_ids_bt = (jnp.arange(t)[None, :] <= last_index_b[:, None]).astype(jnp.int32)
  model = state_lib.merge(spec, params)
  out = model(inputs_bt, positions_bt, segment_ids_bt, return_hidden=True)
  # hidden[-1] is the last block's output before the final norm; the unused
  # logits are dead code under jit.
  hidden_btd = model.final_norm(out.hidden[-1])
  return scalar_head_rewards(hidden_btd, head['w'], head['b'], last_index_b)


def _side(trainable, batch, side, spec):
  return rewards(trainable['params'], trainable['head'], batch[f'{side}_inputs'],
                 batch[f'{side}_positions'], batch[f'{side}_last_index'], spec=spec)


def loss_and_metrics(trainable, batch, spec: state_lib.ModelSpec):
  """BT loss over the batch's pairs, with accuracy per pair kind."""
  chosen_b = _side(trainable, batch, 'chosen', spec)
  rejected_b = _side(trainable, batch, 'rejected', spec)
  loss, metrics = bradley_terry_loss(chosen_b, rejected_b)
  correct_b = (chosen_b > rejected_b).astype(jnp.float32)
  for k, name in enumerate(KINDS):
    is_kind = (batch['kind'] == k).astype(jnp.float32)
    metrics[f'accuracy/{name}'] = jnp.sum(correct_b * is_kind) / jnp.maximum(is_kind.sum(), 1.0)
    metrics[f'num_pairs/{name}'] = is_kind.sum()
  return loss, metrics


def train_step(state, batch, *, spec: state_lib.ModelSpec, tx: optax.GradientTransformation,
               schedule):
  """One optimizer step on the backbone and head; pure, jitted once by `run`."""
  trainable = {'params': state['params'], 'head': state['head']}
  grads, metrics = jax.grad(loss_and_metrics, has_aux=True)(trainable, batch, spec)
  updates, opt_state = tx.update(grads, state['opt_state'], trainable)
  trainable = optax.apply_updates(trainable, updates)
  new_state = {**trainable, 'opt_state': opt_state, 'step': state['step'] + 1,
               'rng': state['rng']}
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state['step']))
  return new_state, metrics


def jit_train_step(spec, tx, schedule, state_shardings, batch_sharding):
  """The jitted step: explicit shardings, state donated (updated in place)."""
  step = functools.partial(train_step, spec=spec, tx=tx, schedule=schedule)
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=0)


def jit_rewards(spec, mesh, rules) -> Callable:
  """(params, head, inputs, positions, last_index) -> [B] rewards, replicated.

  Host rows (the same global rows on every process) are placed batch-sharded
  first, then scored by `rewards` jitted with explicit shardings.
  """
  bs, rep = sharding.batch_sharding(mesh, rules), sharding.replicated(mesh)
  fn = jax.jit(functools.partial(rewards, spec=spec),
               in_shardings=(spec.param_shardings, {'w': rep, 'b': rep}, bs, bs, bs),
               out_shardings=rep)

  def call(params, head, inputs, positions, last_index):
    return fn(params, head, *jax.device_put((inputs, positions, last_index), bs))
  return call


def _batch_ways(mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def score_rows(reward_fn, params, head, row_arrays: dict, batch_size: int) -> np.ndarray:
  """Rewards of N rows in fixed-size batches (the last padded with copies of
  its first row and dropped): one compiled shape per row length."""
  n = len(row_arrays['last_index'])
  out = []
  for start in range(0, n, batch_size):
    chunk = {k: v[start:start + batch_size] for k, v in row_arrays.items()}
    real = len(chunk['last_index'])
    chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)])
             for k, v in chunk.items()}
    r = reward_fn(params, head, chunk['inputs'], chunk['positions'], chunk['last_index'])
    out.append(np.asarray(jax.device_get(r))[:real])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def pairwise_eval(reward_fn, params, head, pairs: Pairs, batch_size: int) -> dict:
  """Held-out pairwise accuracy overall and per kind (a kind with no pairs
  has a count of 0 and no accuracy key), BT loss, and r's mean and std over
  both sides."""
  if not len(pairs):
    return {'eval_pairs': 0}
  side = lambda s: {k: pairs.arrays[f'{s}_{k}'] for k in ('inputs', 'positions', 'last_index')}
  r_c = score_rows(reward_fn, params, head, side('chosen'), batch_size).astype(np.float64)
  r_r = score_rows(reward_fn, params, head, side('rejected'), batch_size).astype(np.float64)
  margin = r_c - r_r
  metrics = {'pairwise_accuracy': float(np.mean(margin > 0)), 'eval_pairs': len(pairs),
             'eval_bt_loss': float(np.mean(np.logaddexp(0.0, -margin))),
             'eval_margin': float(np.mean(margin))}
  for k, name in enumerate(KINDS):
    on = pairs.arrays['kind'] == k
    metrics[f'eval_pairs/{name}'] = int(on.sum())
    if on.any():
      metrics[f'pairwise_accuracy/{name}'] = float(np.mean(margin[on] > 0))
  both = np.concatenate([r_c, r_r])
  metrics['reward_mean'], metrics['reward_std'] = float(both.mean()), float(both.std())
  return metrics


# ------------------------------------------------------------------ stage ---


def stage_pairs(data: stage_data.StageData, cfg, tokenizer, *, seed: int) -> tuple[Pairs, Pairs]:
  """(train pairs, eval pairs) of a stage: each split's records pair only
  among themselves."""
  train_texts, train_stats = pair_texts(data.all_train(), cfg.pairs, seed=seed)
  eval_texts, eval_stats = pair_texts(data.eval, cfg.pairs, seed=seed + 1)
  if not train_texts:
    raise ValueError(f'stage {cfg.name!r}: no training pairs (stats {train_stats}); add a '
                     'chat or reasoning_gym source, or lower pairs.min_rating_gap')
  return (tokenize_pairs(train_texts, train_stats, tokenizer, cfg.seq_len),
          tokenize_pairs(eval_texts, eval_stats, tokenizer, cfg.seq_len))


def run(cfg, ctx: loop.StageContext) -> dict:
  """Trains a reward model on derived preference pairs; returns
  {'steps', 'eval', 'history'} with held-out pairwise accuracy in 'eval'."""
  check_batch_config(cfg, ctx.mesh)
  if cfg.grad_accum != 1:
    raise ValueError(f'stage {cfg.name!r}: reward_model does not accumulate gradients; '
                     'set grad_accum=1 and lower batch_size instead')
  bad = {n: s.kind for n, s in cfg.data.sources.items() if s.kind not in SUPPORTED_SOURCES}
  if bad:
    raise ValueError(f'stage {cfg.name!r}: data.sources {bad} cannot make preference pairs; '
                     f'reward_model supports source kinds {SUPPORTED_SOURCES}')
  spec = state_lib.model_spec(ctx.models[cfg.model], ctx.mesh, ctx.rules)
  if ctx.init_params_path:
    params = checkpoint.load_params(ctx.init_params_path, state_lib.abstract_params(spec))
    logging.info('%s: backbone from %s', ctx.name, ctx.init_params_path)
  else:
    params = state_lib.init_params(spec, ctx.seed)

  train_pairs, eval_pairs = stage_pairs(stage_data.load(cfg.data, seed=ctx.data_seed), cfg,
                                        ctx.tokenizer, seed=ctx.data_seed)
  logging.info('%s: train pairs %s; eval pairs %s', ctx.name, train_pairs.stats,
               eval_pairs.stats)

  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  state, state_shardings = state_lib.init_train_state(
      spec, params, tx, ctx.mesh, ctx.seed,
      extras={'head': init_head(spec.config.d_model, ctx.seed)})
  batch_sharding = sharding.batch_sharding(ctx.mesh, ctx.rules)
  step_fn = jit_train_step(spec, tx, schedule, state_shardings, batch_sharding)
  state, history = loop.train_loop(
      ctx, state=state, step_fn=step_fn,
      data_iter=PairIterator(train_pairs, cfg.batch_size, ctx.seed), total_steps=cfg.steps,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
      tokens_per_step=2 * cfg.batch_size * cfg.seq_len, batch_sharding=batch_sharding)
  checkpoint.save_params(os.path.join(ctx.stage_dir, 'final'),
                         {'params': state['params'], 'head': state['head']})
  checkpoint.write_model_meta(ctx.stage_dir, ctx.tokenizer, spec.config)

  eval_batch = -(-cfg.eval.batch_size // _batch_ways(ctx.mesh)) * _batch_ways(ctx.mesh)
  metrics = pairwise_eval(jit_rewards(spec, ctx.mesh, ctx.rules), state['params'],
                          state['head'], eval_pairs, eval_batch)
  metrics.update({f'pairs/{k}': v for k, v in train_pairs.stats.items()})
  if ctx.is_logger:
    checkpoint.write_json(os.path.join(ctx.stage_dir, INFO_FILE),
                          {'seq_len': cfg.seq_len, 'reward_mean': metrics.get('reward_mean', 0.0),
                           'reward_std': metrics.get('reward_std', 1.0), 'eval': metrics},
                          indent=2)
  if rows := loop.train_rows(history):
    metrics['final_train_loss'] = rows[-1]['loss']
  return {'steps': cfg.steps, 'eval': metrics, 'history': history}


# ------------------------------------------------------------ as a reward ---


class Scorer:
  """Scores (prompt messages, completion) pairs with a trained reward model.

  Attributes `mean` and `std` are r's mean and std over the RM's held-out
  responses (0 and 1 when the stage did not record them).
  """

  def __init__(self, spec, params, head, tokenizer, mesh, rules, *, batch_size: int,
               max_len: int, mean: float = 0.0, std: float = 1.0):
    ways = _batch_ways(mesh)
    self.batch_size = -(-batch_size // ways) * ways
    self.params, self.head, self.tokenizer, self.max_len = params, head, tokenizer, max_len
    self.mean, self.std = float(mean), float(std)
    self._fn = jit_rewards(spec, mesh, rules)

  def __call__(self, prompts_messages: Sequence[Sequence[dict]],
               completions: Sequence[str]) -> np.ndarray:
    """[N] float32 rewards; the completion is scored as a full assistant turn."""
    if len(prompts_messages) != len(completions):
      raise ValueError(f'{len(prompts_messages)} prompts for {len(completions)} completions')
    ids = [encode(p, c, self.tokenizer) for p, c in zip(prompts_messages, completions)]
    out = np.zeros((len(ids),), np.float32)
    for start in range(0, len(ids), self.batch_size):
      chunk = ids[start:start + self.batch_size]
      # A power-of-two length bucket: a handful of compiled shapes in all.
      length = min(sampling.bucket(max(len(x) for x in chunk)), self.max_len)
      out[start:start + len(chunk)] = score_rows(
          self._fn, self.params, self.head, rows(chunk, length, self.tokenizer.pad_id),
          self.batch_size)
    return out


def load_scorer(path: str, model_config, tokenizer, mesh, rules, *, batch_size: int = 32,
                max_len: int | None = None) -> Scorer:
  """Loads a reward_model stage's `final/` (give the stage folder or `final/`).

  Args:
    path: the stage folder, or its `final/` params folder.
    model_config: the backbone's models.llama.ModelConfig.
    tokenizer: must be the one the RM was trained with (checked).
    mesh, rules: where to place it.
    batch_size: rows per jitted call (rounded up to the mesh's batch ways).
    max_len: longest sequence scored (longer ones keep their last max_len
      tokens); default the stage's seq_len.
  """
  final = os.path.join(path, 'final') if os.path.isdir(os.path.join(path, 'final')) else path
  stage_dir = os.path.dirname(os.path.abspath(final))
  checkpoint.check_same_tokenizer(final, tokenizer, what='reward model')
  info = {}
  if os.path.exists(os.path.join(stage_dir, INFO_FILE)):
    with open(os.path.join(stage_dir, INFO_FILE)) as f:
      info = json.load(f)
  spec = state_lib.model_spec(model_config, mesh, rules)
  rep = sharding.replicated(mesh)
  like = {'params': state_lib.abstract_params(spec),
          'head': {'w': jax.ShapeDtypeStruct((model_config.d_model,), jnp.float32, sharding=rep),
                   'b': jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)}}
  loaded = checkpoint.load_params(final, like)
  return Scorer(spec, loaded['params'], loaded['head'], tokenizer, mesh, rules,
                batch_size=batch_size, max_len=max_len or info.get('seq_len', 512),
                mean=info.get('reward_mean', 0.0), std=info.get('reward_std', 1.0) or 1.0)


def preference_reward(scorer: Scorer, *, squash: str = 'tanh',
                      tasks: Sequence[str] | None = None,
                      prompt_of: Callable = stage_data.eval_input) -> Callable:
  """A reward function (pipeline.rewards signature) from a Scorer.

  Each completion is scored after `prompt_of(record)` (default
  `stage_data.eval_input`, the prompt GRPO's roller gives the policy), then standardised with the RM's held-out mean and std,
  z = (r - μ) / σ, which fixes BT's free offset and scale; squash='tanh' maps z
  into (-1, 1) so the term sits on the same scale as the 0/1 verifiers,
  squash='none' returns z. Records whose task is not in `tasks` (None: all)
  get None (not applicable). Pass it as an extra, in-process function:
  rewards.default_reward_system(cfg, extra_functions={'preference': fn}).
  """
  if squash not in ('tanh', 'none'):
    raise ValueError(f"squash must be 'tanh' or 'none', got {squash!r}")

  def fn(prompts, completions, *, records, **_):
    del prompts  # rendered from the records, with the chat template
    use = [i for i, r in enumerate(records) if tasks is None or r['task'] in tasks]
    out: list[float | None] = [None] * len(completions)
    if not use:
      return out
    r = scorer([prompt_of(records[i]) for i in use], [completions[i] for i in use])
    z = (r.astype(np.float64) - scorer.mean) / scorer.std
    for i, v in zip(use, np.tanh(z) if squash == 'tanh' else z):
      out[i] = float(v)
    return out

  return fn
