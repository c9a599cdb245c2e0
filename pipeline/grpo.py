"""On-policy GRPO (Shao et al. 2024) with the DAPO refinements the source
report uses: no KL term by default (β = 0 keeps no reference model), clip-higher
(ε_low, ε_high), token-mean loss, truncated completions masked, a pass-rate
band filter before the stage and dynamic sampling during it.

One step: take P prompts → sample G completions each (one batched, jitted,
cached call) → score them with the stage's reward functions → group-normalised
advantages → drop zero-variance groups and sample replacements → μ updates
(`num_iterations`) against the rollout policy's log-probs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from data.chat import render_prompt
from losses import grpo as grpo_losses
from losses.ce import token_log_probs
from pipeline import checkpoint, evaluate, loop, rewards, sampling, sharding, sft, stage_data
from pipeline import state as state_lib
from pipeline.optim import make_optimizer


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """The stage's `grpo` config, hashable for jit."""
  group_size: int  # G
  num_iterations: int  # μ
  epsilon_low: float  # ε_low
  epsilon_high: float  # ε_high (clip-higher, DAPO)
  beta: float  # β of the k3 KL to the reference; 0 keeps no reference
  scale_rewards: str  # 'group' | 'batch' | 'none'
  negative_weight: float  # multiplies negative advantages (1 = GRPO, 0 = reinforce successes only)
  loss_agg: str  # 'token_mean' | 'seq_mean_token_mean' | 'seq_mean_token_sum_norm'
  temperature: float
  max_new_tokens: int  # L
  sft_coef: float  # λ of the CE anchor on the stage's reference answers (0 = none)
  greedy_in_group: bool = False  # each group's first completion is the greedy one


class PromptIterator:
  """Prompt records in a seeded order, reshuffled every epoch; its state is
  the number of prompts handed out, so resuming replays exactly."""

  def __init__(self, records: list[dict], batch: int, seed: int):
    self.records, self.batch, self.seed, self.position = records, batch, seed, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

  def take(self, n: int) -> list[dict]:
    out = []
    for _ in range(n):
      epoch, i = divmod(self.position, len(self.records))
      out.append(self.records[self._order(epoch)[i]])
      self.position += 1
    return out

  def __next__(self) -> list[dict]:
    return self.take(self.batch)

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = state['position']


class AnchoredPrompts:
  """PromptIterator plus the stage's packed SFT batches (reference answers)
  for the CE anchor; next() gives (prompt records, SFT batch), and its state
  holds both positions."""

  def __init__(self, prompts: PromptIterator, sft_batches):
    self.prompts, self.sft_batches = prompts, sft_batches

  def take(self, n: int) -> list[dict]:
    return self.prompts.take(n)

  def __next__(self) -> tuple[list[dict], dict]:
    return next(self.prompts), next(self.sft_batches)

  def get_state(self) -> dict:
    return {'prompts': self.prompts.get_state(), 'sft': self.sft_batches.get_state()}

  def set_state(self, state: dict) -> None:
    self.prompts.set_state(state['prompts'])
    self.sft_batches.set_state(state['sft'])


# ------------------------------------------------------------- the update ---

def policy_log_probs(params, batch, spec, temperature: float):
  """log π(token) and entropy under the sampling temperature, [B, T] each."""
  logits = state_lib.merge(spec, params)(batch['inputs'], batch['positions']).logits
  logits = logits / temperature
  return token_log_probs(logits, batch['targets']), grpo_losses.token_entropy(logits)


def train_step(state, batch, *, spec, tx, schedule, cfg: GRPOConfig):
  """One policy-gradient update on a rollout batch (pure; jitted once).

  batch: inputs/targets/positions/mask [B, T], old_logp [B, T] (the rollout
  policy), advantages [B], truncated [B], ref_logp [B, T] when β > 0, and
  'sft' (a packed SFT batch) when sft_coef λ > 0: the loss is then
  GRPO + λ·CE on reference answers (InstructGPT's PPO-ptx anchor).
  """
  def policy_loss(params):
    logp, entropy = policy_log_probs(params, batch, spec, cfg.temperature)
    return grpo_losses.grpo_loss(
        logp, batch['old_logp'], batch['advantages'], batch['mask'],
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
        ref_logp_bt=batch.get('ref_logp'), loss_agg=cfg.loss_agg,
        max_tokens=cfg.max_new_tokens, truncated_b=batch['truncated'], entropy_bt=entropy)

  def anchor_loss(params):
    ce_sum, sums = sft.loss_and_metrics(params, batch['sft'], spec)
    return cfg.sft_coef * ce_sum / jnp.maximum(sums['num_tokens'], 1.0)

  grads, metrics = jax.grad(policy_loss, has_aux=True)(state['params'])
  if cfg.sft_coef > 0:
    # The two terms read disjoint batches: their gradients separately cost
    # what the sum's does, and show which term steers the update.
    anchor, anchor_grads = jax.value_and_grad(anchor_loss)(state['params'])
    pg_norm, anchor_norm = optax.tree.norm(grads), optax.tree.norm(anchor_grads)
    metrics = {**metrics, 'policy_loss': metrics['loss'], 'sft_loss': anchor / cfg.sft_coef,
               'loss': metrics['loss'] + anchor, 'policy_grad_norm': pg_norm,
               'sft_grad_norm': anchor_norm,  # of λ·CE
               'grad_cosine': optax.tree.vdot(grads, anchor_grads) /
                              jnp.maximum(pg_norm * anchor_norm, 1e-12)}
    grads = jax.tree.map(jnp.add, grads, anchor_grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = {**state, 'params': optax.apply_updates(state['params'], updates),
               'opt_state': opt_state, 'step': state['step'] + 1}
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state['step']))
  return new_state, metrics


# --------------------------------------------------------------- rollouts ---

@dataclasses.dataclass
class Rollout:
  records: list[dict]  # one per row (each prompt repeated G times)
  prompt_ids: list[np.ndarray]
  samples: sampling.Samples
  rewards: np.ndarray  # [B] weighted total
  per_function: dict[str, np.ndarray]  # NaN where not applicable
  stats: dict[str, float]


class Roller:
  """Samples G completions per prompt and scores them."""

  def __init__(self, spec, tokenizer, reward_system, cfg: GRPOConfig, top_k: int, top_p: float):
    self.spec, self.tokenizer, self.reward_system, self.cfg = spec, tokenizer, reward_system, cfg
    self.sampling = sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                            temperature=cfg.temperature, top_k=top_k, top_p=top_p)

  def _generate(self, params, prompt_ids, rng, cfg: sampling.SamplingConfig) -> sampling.Samples:
    return sampling.generate(self.spec, params, prompt_ids, cfg, rng=rng,
                             end_id=self.tokenizer.end_id, pad_id=self.tokenizer.pad_id,
                             batch_size=len(prompt_ids))

  def __call__(self, params, prompt_records: list[dict], rng, group_size: int,
               with_greedy: bool | None = None) -> Rollout:
    """with_greedy (default cfg.greedy_in_group): each group's first
    completion is the greedy one, the other G - 1 are sampled at T; the
    group's advantages then rank the samples against what greedy decoding,
    the held-out suite's decoding, would answer."""
    with_greedy = self.cfg.greedy_in_group if with_greedy is None else with_greedy
    records = [r for r in prompt_records for _ in range(group_size)]
    prompt_ids = [render_prompt(stage_data.generation_prompt(r), self.tokenizer)
                  for r in records]
    if with_greedy:
      first = np.arange(len(records)) % group_size == 0
      greedy = self._generate(params, [p for p, f in zip(prompt_ids, first) if f], rng,
                              dataclasses.replace(self.sampling, temperature=0.0))
      sampled = self._generate(params, [p for p, f in zip(prompt_ids, first) if not f], rng,
                               self.sampling)
      # Row i of the concatenation [greedy; sampled] goes back to its place.
      order = np.argsort(np.concatenate([np.flatnonzero(first), np.flatnonzero(~first)]))
      samples = sampling.Samples(*[
          np.concatenate([getattr(greedy, f.name), getattr(sampled, f.name)])[order]
          for f in dataclasses.fields(sampling.Samples)])
    else:
      samples = self._generate(params, prompt_ids, rng, self.sampling)
    completions = evaluate.decode_all(samples, self.tokenizer)
    prompts = [self.tokenizer.decode(p) for p in prompt_ids]
    total, per_function, stats = self.reward_system(
        prompts, completions, records=records, truncated=list(samples.truncated),
        lengths=list(samples.lengths), max_new_tokens=self.cfg.max_new_tokens)
    return Rollout(records, prompt_ids, samples, np.asarray(total, np.float32), per_function,
                   stats)


def outcome(rollout: Rollout, correctness: tuple[str, ...]) -> np.ndarray | None:
  """[B] the verifier's score (the best of the `correctness` functions that
  apply; 0 where none does); None when the stage has no verifier."""
  scores = [np.nan_to_num(rollout.per_function[n], nan=0.0) for n in correctness
            if n in rollout.per_function]
  return np.max(scores, axis=0) if scores else None


def solved(rollout: Rollout, correctness: tuple[str, ...]) -> np.ndarray:
  """[B] bool: a correctness reward (verifier) gave full marks."""
  scores = outcome(rollout, correctness)
  return scores >= 1.0 if scores is not None else np.zeros(len(rollout.records), bool)


def uninformative_groups(rollout: Rollout, correctness: tuple[str, ...],
                         group_size: int) -> np.ndarray:
  """[P] bool: groups whose G samples the verifier scores alike.

  DAPO's dynamic sampling drops the groups whose accuracy is 0 or 1, not the
  ones whose total reward is constant: with shaping terms in the total
  (format, overlong, steps), a group of eight wrong answers still varies in
  length, and group-std scaling turns a 0.1-weight length term into the same
  ±1 advantages as right against wrong. With the `steps` reward and no
  pass-rate filter, that taught the 0.2M student to end chain sums a term
  early (held-out chain sums 0.535 -> 0.335; README: "RL recipe probes")."""
  scores = outcome(rollout, correctness)
  return np.asarray(grpo_losses.zero_variance_groups(
      jnp.asarray(rollout.rewards if scores is None else scores), group_size))


def pass_rate_filter(roller: Roller, params, records: list[dict], cfg, correctness, seed: int):
  """Keeps the prompts the current policy solves in [low, high] of k samples
  (the report: 10%..90% of 16): too easy or too hard teaches nothing."""
  kept, rates = [], []
  key = jax.random.key(seed)
  chunk = max(1, cfg.batch_prompts)
  for start in range(0, len(records), chunk):
    part = records[start:start + chunk]
    key, sub = jax.random.split(key)
    rollout = roller(params, part, sub, cfg.k, with_greedy=False)
    rate = solved(rollout, correctness).reshape(len(part), cfg.k).mean(axis=1)
    rates += rate.tolist()
    kept += [r for r, p in zip(part, rate) if cfg.low <= p <= cfg.high]
  return kept, np.asarray(rates)


def load_filter(path: str, candidates: list[dict]) -> tuple[list[dict], dict]:
  """(kept prompts, stats) of a filter.json, the prompts in the order the
  filter kept them: the order the stage's prompt iterator permutes, so a
  resumed stage draws the prompts an uninterrupted one does."""
  with open(path) as f:
    saved = json.load(f)
  by_id = {r['id']: r for r in candidates}
  missing = [i for i in saved['kept'] if i not in by_id]
  if missing:
    raise ValueError(f'{path} keeps {len(missing)} prompts that are not among the stage\'s '
                     f'candidates (e.g. {missing[:3]}): its data changed since the filter ran; '
                     'delete the file to filter again')
  return [by_id[i] for i in saved['kept']], saved['stats']


def build_batch(rollouts: list[Rollout], groups: list[tuple[int, int]], advantages, *,
                num_groups: int, group_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """Training rows for the kept groups; missing groups (dynamic sampling ran
  out of rounds) are filler rows with an all-zero mask."""
  rows, adv, trunc = [], [], []
  for (r_idx, g_idx), a in zip(groups, advantages):
    ro = rollouts[r_idx]
    for j in range(g_idx * group_size, (g_idx + 1) * group_size):
      rows.append(sampling.prompt_completion_row(
          ro.prompt_ids[j], sampling.completion_ids(ro.samples, j), seq_len))
      trunc.append(bool(ro.samples.truncated[j]))
    adv += list(a)
  filler = sampling.prompt_completion_row(rollouts[0].prompt_ids[0], np.zeros(0, np.int32),
                                         seq_len)
  filler['mask'][:] = 0.0  # contributes nothing to the loss
  while len(rows) < num_groups * group_size:
    rows.append(filler)
    adv.append(0.0)
    trunc.append(False)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch['advantages'] = np.asarray(adv, np.float32)
  batch['truncated'] = np.asarray(trunc)
  return batch


# ------------------------------------------------------------------ stage ---

def _preference_reward(cfg, ctx: loop.StageContext) -> dict:
  """{'preference': the trained reward model's score} when the stage uses it."""
  if 'preference' not in cfg.rewards.functions:
    return {}
  from pipeline import reward_model
  if not ctx.reward_model_path:
    raise ValueError(f"stage {cfg.name!r} uses the 'preference' reward but no reward_model "
                     'stage ran before it (set reward_model= the name of that stage)')
  scorer = reward_model.load_scorer(ctx.reward_model_path, ctx.models[ctx.reward_model_name],
                                    ctx.tokenizer, ctx.mesh, ctx.rules)
  return {'preference': reward_model.preference_reward(
      scorer, tasks=('chat',), prompt_of=stage_data.generation_prompt)}


def run(cfg, ctx: loop.StageContext) -> dict:
  """GRPO on cfg.model; returns {'steps', 'eval', 'history'}."""
  gcfg = GRPOConfig(**cfg.grpo.to_dict())
  spec = state_lib.model_spec(ctx.models[cfg.model], ctx.mesh, ctx.rules)
  if not ctx.init_params_path:
    raise ValueError(f'stage {cfg.name!r}: GRPO starts from a trained policy; '
                     "init_from must be 'previous' after an earlier stage or a params folder")
  params = checkpoint.load_params(ctx.init_params_path, state_lib.abstract_params(spec))
  reward_system = rewards.default_reward_system(
      cfg.rewards.to_dict(), extra_functions=_preference_reward(cfg, ctx))
  roller = Roller(spec, ctx.tokenizer, reward_system, gcfg, cfg.sampling.top_k,
                  cfg.sampling.top_p)
  correctness = tuple(cfg.filter.functions)

  # Prompts: the stage's training records that a reward function applies to.
  data = stage_data.load(cfg.data, seed=ctx.data_seed)
  candidates = data.all_train()
  filter_path = os.path.join(ctx.stage_dir, 'filter.json')
  resumed = checkpoint.exists_on_every_process(filter_path)  # the filter ran already
  if resumed:
    prompts, filter_stats = load_filter(filter_path, candidates)
  elif cfg.filter.enabled:
    pool = PromptIterator(candidates, 1, ctx.seed).take(min(cfg.filter.num_candidates,
                                                            len(candidates)))
    t0 = time.perf_counter()
    prompts, rates = pass_rate_filter(roller, params, pool, cfg.filter, correctness, ctx.seed)
    filter_stats = {'candidates': len(pool), 'kept': len(prompts),
                    'mean_pass_rate': float(rates.mean()),
                    'too_easy': int((rates > cfg.filter.high).sum()),
                    'too_hard': int((rates < cfg.filter.low).sum()),
                    'wall_s': time.perf_counter() - t0}
    logging.info('%s: pass-rate filter %s', ctx.name, filter_stats)
    if not prompts:
      raise ValueError(f'stage {cfg.name!r}: the pass-rate filter kept no prompt of '
                       f'{len(pool)} ({filter_stats}); widen filter.low/high or train longer')
    uses = cfg.steps * cfg.prompts_per_step / len(prompts)
    filter_stats['uses_per_prompt'] = uses
    if uses > 1.5:
      # Measured: 126 kept prompts used 2.5 times each cost 2.8 points of
      # held-out math, 63 used 5 times 8 points on their own two tasks, while
      # training accuracy on them rose; fresh prompts cost nothing (README:
      # "RL recipe probes").
      logging.warning('%s: the filter kept %d prompts for %d steps x %d: each is used '
                      '%.1f times, and a small policy memorises repeated prompts; raise '
                      'filter.num_candidates', ctx.name, len(prompts), cfg.steps,
                      cfg.prompts_per_step, uses)
  else:
    prompts = candidates
    filter_stats = {'candidates': len(candidates), 'kept': len(candidates)}
  if ctx.is_logger and not resumed:
    checkpoint.write_json(filter_path, {'kept': [r['id'] for r in prompts],
                                        'stats': filter_stats})

  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  state, shardings = state_lib.init_train_state(spec, params, tx, ctx.mesh, ctx.seed)
  batch_sharding = sharding.batch_sharding(ctx.mesh, ctx.rules)
  step = jax.jit(functools.partial(train_step, spec=spec, tx=tx, schedule=schedule, cfg=gcfg),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)
  logp_fn = jax.jit(lambda p, b: policy_log_probs(p, b, spec, gcfg.temperature)[0])
  # β = 0: no reference kept. A copy: the step donates the state, whose params
  # are these very buffers.
  ref_params = jax.tree.map(jnp.copy, params) if gcfg.beta > 0 else None
  prompt_iter = PromptIterator(prompts, cfg.prompts_per_step, ctx.seed)
  data_iter = prompt_iter
  if gcfg.sft_coef > 0:
    data_iter = AnchoredPrompts(prompt_iter, stage_data.train_iterator(
        data, ctx.tokenizer, cfg, seed=ctx.seed))
  g = gcfg.group_size

  def step_fn(state, step_data):
    prompt_records, sft_batch = step_data if gcfg.sft_coef > 0 else (step_data, None)
    t0 = time.perf_counter()
    base_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), int(state['step']))
    rollouts, groups, advantages = [], [], []
    zero_var = total_groups = 0
    for round_idx in range(cfg.max_sampling_rounds):
      ro = roller(state['params'], prompt_records, jax.random.fold_in(base_key, round_idx), g)
      rollouts.append(ro)
      adv = np.asarray(grpo_losses.group_advantages(
          jnp.asarray(ro.rewards), g, scale_rewards=gcfg.scale_rewards,
          negative_weight=gcfg.negative_weight)).reshape(-1, g)
      flat = uninformative_groups(ro, correctness, g)
      zero_var += int(flat.sum())
      total_groups += len(flat)
      for gi in np.flatnonzero(~flat):
        if len(groups) < cfg.prompts_per_step:
          groups.append((len(rollouts) - 1, gi))
          advantages.append(adv[gi])
      if len(groups) >= cfg.prompts_per_step or not cfg.dynamic_sampling:
        break
      prompt_records = prompt_iter.take(cfg.prompts_per_step)  # replacements
    t_gen_score = time.perf_counter() - t0
    batch = build_batch(rollouts, groups, advantages, num_groups=cfg.prompts_per_step,
                        group_size=g, seq_len=cfg.seq_len)
    batch = sharding.shard_global_batch(batch, batch_sharding)  # the same on every process
    batch['old_logp'] = logp_fn(state['params'], batch)
    if ref_params is not None:
      batch['ref_logp'] = logp_fn(ref_params, batch)
    if sft_batch is not None:
      batch['sft'] = sharding.shard_batch(sft_batch, batch_sharding)
    t1 = time.perf_counter()
    for _ in range(gcfg.num_iterations):
      state, metrics = step(state, batch)
    metrics = dict(metrics)
    first = rollouts[0]
    metrics.update({
        'reward_mean': float(first.rewards.mean()), 'reward_std': float(first.rewards.std()),
        'zero_variance_fraction': zero_var / max(total_groups, 1),
        'groups_kept': len(groups), 'sampling_rounds': len(rollouts),
        'completion_length': float(first.samples.lengths.mean()),
        'truncation_rate': float(first.samples.truncated.mean()),
        'accuracy': float(solved(first, correctness).mean()),
        'time_generate_score_s': t_gen_score, 'time_update_s': time.perf_counter() - t1})
    for name, values in first.per_function.items():
      if np.isfinite(values).any():
        metrics[f'reward/{name}'] = float(np.nanmean(values))
    for name, value in first.stats.items():
      if isinstance(value, (int, float)):
        metrics[f'reward_stats/{name}'] = float(value)
    return state, metrics

  state, history = loop.train_loop(
      ctx, state=state, step_fn=step_fn, data_iter=data_iter, total_steps=cfg.steps,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
      tokens_per_step=cfg.prompts_per_step * g * gcfg.max_new_tokens)
  checkpoint.save_params(os.path.join(ctx.stage_dir, 'final'), state['params'])
  checkpoint.write_model_meta(ctx.stage_dir, ctx.tokenizer, spec.config)
  metrics = evaluate.evaluate(spec, state['params'], ctx.tokenizer, ctx.eval_records, cfg.eval,
                              seed=ctx.seed, items_path=ctx.eval_items_path)
  metrics.update({f'filter/{k}': v for k, v in filter_stats.items()})
  if rows := loop.train_rows(history):
    metrics['train_reward_first'] = rows[0]['reward_mean']
    metrics['train_reward_last'] = rows[-1]['reward_mean']
  return {'steps': cfg.steps, 'eval': metrics, 'history': history}
