"""Dual Preference Distillation: a frozen large teacher into a small student.

Three levels, each with its own weight so ablations switch them off
(`losses/distill.py` has the formulas):
  logit      KL(teacher || student) of next-token distributions at temperature τ
  hidden     MSE or 1 - cos between W·h_S and h_T over a student→teacher layer map,
             with the projection W trained alongside the student and dropped after
  preference on (prompt, y⁺, y⁻) pairs: token KL on y⁺ and y⁻ plus DPO against
             the student as it entered the stage
plus an optional cross-entropy on the data's own responses (`ce_weight`; the
"student SFT alone" baseline is ce_weight=1 and every other weight 0).

On-policy mode (GKD, Agarwal et al. 2024): with probability λ =
`on_policy.fraction` a step trains on completions the current student samples
for the stage's prompts instead of the data batch; the teacher scores them
token by token (logit and hidden levels; no CE, the samples are not labels).
Which steps are on-policy and which prompts they use are functions of the
step, so a resumed run replays them.

The teacher's params are a separate, non-donated argument of the train step:
sharded on the same mesh, never differentiated, never updated.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from data.chat import render_prompt
from losses import distill as distill_losses
from losses.ce import masked_cross_entropy
from pipeline import checkpoint, evaluate, loop, sampling, sharding, stage_data
from pipeline.evaluate import decode_all
from pipeline import state as state_lib
from pipeline.optim import make_optimizer
from pipeline.sft import check_batch_config

# ----------------------------------------------------------------- pairs ---

@dataclasses.dataclass
class Pairs:
  """Preference pairs as padded arrays [N, T]; ref_* are the frozen student's
  sequence log-probs."""
  arrays: dict[str, np.ndarray]
  stats: dict[str, float]

  def __len__(self):
    return len(self.arrays['ref_chosen'])

  def take(self, step: int, count: int) -> dict[str, np.ndarray]:
    """Pairs for a step: a deterministic function of the step, so resuming
    from a checkpoint replays exactly the same pairs."""
    idx = (step * count + np.arange(count)) % len(self)
    return {k: v[idx] for k, v in self.arrays.items()}


def build_pairs(teacher: state_lib.ModelSpec, teacher_params, student: state_lib.ModelSpec,
                student_params, tokenizer, records, cfg, *, seq_len: int, seed: int) -> Pairs:
  """y⁺ from the teacher (kept when the task's scorer accepts it, else the
  dataset response), y⁻ from the student (kept when it scores below y⁺).

  Only records with a scorer (math, code, agent) make pairs.
  """
  records = [r for r in records if r['task'] != 'chat'][:cfg.num_prompts]
  prompts = [render_prompt(stage_data.eval_input(r), tokenizer) for r in records]
  sample_cfg = sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                       temperature=cfg.temperature)
  gen = functools.partial(sampling.generate, prompts=prompts, cfg=sample_cfg,
                          end_id=tokenizer.end_id, pad_id=tokenizer.pad_id, batch_size=64)
  key_t, key_s = jax.random.split(jax.random.key(seed))
  from_teacher = gen(teacher, teacher_params, rng=key_t)
  from_student = gen(student, student_params, rng=key_s)
  t_scores = evaluate.score_completions(records, decode_all(from_teacher, tokenizer))
  s_scores = evaluate.score_completions(records, decode_all(from_student, tokenizer))
  rows, teacher_used = [], 0
  for i, record in enumerate(records):
    if t_scores[i] >= 1.0:
      chosen, chosen_score = sampling.completion_ids(from_teacher, i), t_scores[i]
      teacher_used += 1
    else:
      answer = next(m for m in record['messages'] if m['role'] == 'assistant')
      chosen = np.asarray(tokenizer.encode(answer['content']) + [tokenizer.end_id], np.int32)
      chosen_score = 1.0
    if s_scores[i] >= chosen_score:
      continue  # the student already does as well: nothing to prefer
    rejected = sampling.completion_ids(from_student, i)
    rows.append((sampling.prompt_completion_row(prompts[i], chosen, seq_len),
                 sampling.prompt_completion_row(prompts[i], rejected, seq_len)))
  if not rows:
    raise ValueError('distill: no preference pairs could be built (the student matches '
                     'the teacher on every prompt); set loss.preference_weight=0')
  arrays = {f'{side}_{k}': np.stack([r[j][k] for r in rows])
            for j, side in enumerate(('chosen', 'rejected')) for k in rows[0][0]}
  stats = {'pairs': len(rows), 'pair_prompts': len(records),
           'teacher_accept_rate': float(np.mean(np.array(t_scores) >= 1.0)),
           'student_accept_rate': float(np.mean(np.array(s_scores) >= 1.0)),
           'chosen_from_teacher': teacher_used / max(len(records), 1)}
  return Pairs(arrays, stats)


@functools.partial(jax.jit, static_argnames='spec')
def _sequence_logps(params, inputs, targets, positions, mask, spec):
  logits = state_lib.merge(spec, params)(inputs, positions).logits
  return distill_losses.sequence_log_probs(logits, targets, mask)


def add_reference_logps(pairs: Pairs, student: state_lib.ModelSpec, params) -> None:
  """π_ref: the frozen student as it entered the stage, computed once."""
  a = pairs.arrays
  for side in ('chosen', 'rejected'):
    a[f'ref_{side}'] = np.asarray(_sequence_logps(
        params, a[f'{side}_inputs'], a[f'{side}_targets'], a[f'{side}_positions'],
        a[f'{side}_mask'], spec=student))


# ------------------------------------------------------------ train step ---

def distill_loss(trainable, teacher_params, batch, pairs, *, student, teacher, cfg):
  """Weighted sum of the enabled levels; returns (loss, metrics)."""
  need_hidden = cfg.hidden_weight > 0
  s_out = state_lib.merge(student, trainable['params'])(
      batch['inputs'], batch['positions'], batch['segment_ids'], return_hidden=need_hidden)
  t_out = state_lib.merge(teacher, teacher_params)(
      batch['inputs'], batch['positions'], batch['segment_ids'], return_hidden=need_hidden)
  t_logits = jax.lax.stop_gradient(t_out.logits)
  mask = batch['loss_mask']
  total, metrics = 0.0, {}
  if cfg.ce_weight > 0:
    ce, _ = masked_cross_entropy(s_out.logits, batch['targets'], mask)
    total += cfg.ce_weight * ce
    metrics['ce'] = ce
  if cfg.logit_weight > 0:
    kl, _ = distill_losses.logit_kl(s_out.logits, t_logits, mask, temperature=cfg.temperature,
                                    direction=cfg.direction, beta=cfg.jsd_beta,
                                    top_k=cfg.top_k)
    total += cfg.logit_weight * kl
    metrics['logit_kl'] = kl
  if need_hidden:
    hidden, _ = distill_losses.hidden_state_loss(
        s_out.hidden, jax.lax.stop_gradient(t_out.hidden), trainable['projection'], mask,
        layer_map=cfg.layer_map, kind=cfg.hidden_kind)
    total += cfg.hidden_weight * hidden
    metrics['hidden'] = hidden
  if cfg.preference_weight > 0:
    logits = {}
    for side in ('chosen', 'rejected'):
      args = (pairs[f'{side}_inputs'], pairs[f'{side}_positions'])
      logits[side] = (state_lib.merge(student, trainable['params'])(*args).logits,
                      jax.lax.stop_gradient(state_lib.merge(teacher, teacher_params)(*args).logits))
    pref, pref_metrics = distill_losses.preference_distillation_loss(
        student_chosen_logits_btv=logits['chosen'][0],
        teacher_chosen_logits_btv=logits['chosen'][1],
        student_rejected_logits_btv=logits['rejected'][0],
        teacher_rejected_logits_btv=logits['rejected'][1],
        chosen_targets_bt=pairs['chosen_targets'], rejected_targets_bt=pairs['rejected_targets'],
        chosen_mask_bt=pairs['chosen_mask'], rejected_mask_bt=pairs['rejected_mask'],
        ref_chosen_logp_b=pairs['ref_chosen'], ref_rejected_logp_b=pairs['ref_rejected'],
        beta=cfg.dpo_beta, temperature=cfg.temperature, kl_weight=cfg.pref_kl_weight,
        dpo_weight=1.0, direction=cfg.direction, jsd_beta=cfg.jsd_beta, top_k=cfg.top_k)
    total += cfg.preference_weight * pref
    metrics['preference'] = pref
    metrics.update({f'pref/{k}': v for k, v in pref_metrics.items()})
  metrics['loss'] = total
  return total, metrics


def train_step(state, teacher_params, batch, pairs, *, student, teacher, tx, schedule,
               loss_cfg):
  """One step on the student and projection; the teacher is read only."""
  trainable = {'params': state['params'], 'projection': state['projection']}
  grads, metrics = jax.grad(distill_loss, has_aux=True)(
      trainable, teacher_params, batch, pairs, student=student, teacher=teacher, cfg=loss_cfg)
  updates, opt_state = tx.update(grads, state['opt_state'], trainable)
  trainable = optax.apply_updates(trainable, updates)
  new_state = {**trainable, 'opt_state': opt_state, 'step': state['step'] + 1, 'rng': state['rng']}
  metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state['step']))
  return new_state, metrics


# ------------------------------------------------------------- on-policy ---

@dataclasses.dataclass
class OnPolicy:
  """GKD's student-generated batches: a step is on-policy with probability
  `fraction`, decided (like the prompts it samples) by (seed, step) alone."""
  prompts: list[np.ndarray]
  fraction: float
  sample_cfg: sampling.SamplingConfig
  batch_size: int
  seq_len: int
  seed: int
  end_id: int
  pad_id: int

  def _rng(self, step: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, step])

  def chosen(self, step: int) -> bool:
    return self._rng(step).random() < self.fraction

  def batch(self, spec, params, step: int) -> dict[str, np.ndarray]:
    """batch_size rows of prompt + the student's sampled completion, the loss
    mask on the completion; the same keys as a data batch."""
    idx = self._rng(step).choice(len(self.prompts), self.batch_size)
    prompts = [self.prompts[i] for i in idx]
    samples = sampling.generate(spec, params, prompts, self.sample_cfg,
                                rng=jax.random.fold_in(jax.random.key(self.seed), step),
                                end_id=self.end_id, pad_id=self.pad_id)
    completions = [sampling.completion_ids(samples, i) for i in range(len(prompts))]
    rows = [sampling.prompt_completion_row(p, c, self.seq_len)
            for p, c in zip(prompts, completions)]
    batch = {k: np.stack([r[k] for r in rows]) for k in ('inputs', 'targets', 'positions')}
    batch['loss_mask'] = np.stack([r['mask'] for r in rows])
    lengths = np.array([min(len(p) + len(c) - 1, self.seq_len)
                        for p, c in zip(prompts, completions)])
    batch['segment_ids'] = (np.arange(self.seq_len) < lengths[:, None]).astype(np.int32)
    return batch


def _on_policy(cfg, records, tokenizer, seed: int) -> OnPolicy | None:
  if cfg.on_policy.fraction <= 0:
    return None
  if not 0 < cfg.on_policy.fraction <= 1:
    raise ValueError(f'stage {cfg.name!r}: on_policy.fraction (GKD λ) must be in [0, 1], '
                     f'got {cfg.on_policy.fraction}')
  prompts = [render_prompt(stage_data.eval_input(r), tokenizer)
             for r in records if r['task'] != 'chat']
  return OnPolicy(prompts=prompts, fraction=cfg.on_policy.fraction,
                  sample_cfg=sampling.SamplingConfig(max_new_tokens=cfg.on_policy.max_new_tokens,
                                                     temperature=cfg.on_policy.temperature),
                  batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=seed,
                  end_id=tokenizer.end_id, pad_id=tokenizer.pad_id)


# ------------------------------------------------------------------ stage ---

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The stage's `loss` config as a hashable value (a static jit argument)."""
  ce_weight: float
  logit_weight: float  # logit level
  hidden_weight: float  # hidden-state level
  preference_weight: float  # preference level (DPD)
  temperature: float  # τ
  direction: str  # 'forward' | 'reverse' | 'jsd'
  jsd_beta: float  # β of the generalised JSD (GKD)
  top_k: int  # teacher top-k (0 = full distribution)
  hidden_kind: str  # 'mse' | 'cosine'
  layer_map: tuple  # ((student hidden index, teacher hidden index), ...)
  dpo_beta: float  # β of the DPO term
  pref_kl_weight: float  # weight of the token KL on y⁺ and y⁻ inside the preference level


def _loss_config(cfg, student_cfg, teacher_cfg) -> LossConfig:
  layer_map = tuple(tuple(p) for p in cfg.layer_map) or distill_losses.uniform_layer_map(
      student_cfg.num_layers, teacher_cfg.num_layers)
  return LossConfig(**{**cfg.to_dict(), 'layer_map': layer_map})


def run(cfg, ctx: loop.StageContext) -> dict:
  """Distils ctx's teacher into cfg.model; returns {'steps', 'eval', ...}."""
  check_batch_config(cfg, ctx.mesh)
  if cfg.grad_accum != 1:
    raise ValueError(f'stage {cfg.name!r}: distill does not accumulate gradients; '
                     'set grad_accum=1 and lower batch_size instead')
  if not ctx.teacher_params_path:
    raise ValueError(f'stage {cfg.name!r}: no teacher; set teacher= a model trained by an '
                     'earlier stage, or teacher_from= a params checkpoint folder')
  checkpoint.check_same_tokenizer(ctx.teacher_params_path, ctx.tokenizer)
  student = state_lib.model_spec(ctx.models[cfg.model], ctx.mesh, ctx.rules)
  teacher = state_lib.model_spec(ctx.models[cfg.teacher], ctx.mesh, ctx.rules)
  loss_cfg = _loss_config(cfg.loss, student.config, teacher.config)
  teacher_params = checkpoint.load_params(ctx.teacher_params_path,
                                          state_lib.abstract_params(teacher))
  if cfg.init_from == 'teacher_layers':
    params = init_from_teacher(student, teacher, teacher_params, loss_cfg.layer_map)
  elif ctx.init_params_path:
    params = checkpoint.load_params(ctx.init_params_path, state_lib.abstract_params(student))
  else:
    params = state_lib.init_params(student, ctx.seed)

  data = stage_data.load(cfg.data, seed=ctx.data_seed)
  pairs = None
  if loss_cfg.preference_weight > 0:
    pairs = build_pairs(teacher, teacher_params, student, params, ctx.tokenizer,
                        data.all_train(), cfg.pairs, seq_len=cfg.pairs.seq_len, seed=ctx.seed)
    add_reference_logps(pairs, student, params)
    logging.info('%s: %s', ctx.name, pairs.stats)

  # W: d_S -> d_T per mapped layer, trained with the student, dropped afterwards.
  projection = jnp.zeros((len(loss_cfg.layer_map), student.config.d_model,
                          teacher.config.d_model))
  projection = projection + jnp.eye(student.config.d_model, teacher.config.d_model)
  tx, schedule = make_optimizer(cfg.optim, cfg.steps)
  state, shardings = state_lib.init_train_state(
      student, params, tx, ctx.mesh, ctx.seed, extras={'projection': projection})
  batch_sharding = sharding.batch_sharding(ctx.mesh, ctx.rules)
  step = functools.partial(train_step, student=student, teacher=teacher, tx=tx,
                           schedule=schedule, loss_cfg=loss_cfg)
  jit = lambda fn: jax.jit(fn, in_shardings=(shardings, teacher.param_shardings,
                                              batch_sharding, batch_sharding),
                            out_shardings=(shardings, None), donate_argnums=0)
  jitted = jit(step)
  on_policy = _on_policy(cfg, data.all_train(), ctx.tokenizer, ctx.seed)
  # The student's own samples are not labels: no CE on on-policy steps.
  jitted_on_policy = jit(functools.partial(
      step, loss_cfg=dataclasses.replace(loss_cfg, ce_weight=0.0)))
  pair_count = cfg.pairs.per_step

  def step_fn(state, batch):
    step = int(state['step'])
    # Pairs and on-policy samples are computed whole on every process.
    step_pairs = sharding.shard_global_batch(
        pairs.take(step, pair_count) if pairs is not None else _empty_pairs(pair_count),
        batch_sharding)
    if on_policy is None:
      return jitted(state, teacher_params, batch, step_pairs)
    if on_policy.chosen(step):
      sampled = sharding.shard_global_batch(on_policy.batch(student, state['params'], step),
                                            batch_sharding)
      new_state, metrics = jitted_on_policy(state, teacher_params, sampled, step_pairs)
      return new_state, {**metrics, 'on_policy': 1.0}
    new_state, metrics = jitted(state, teacher_params, batch, step_pairs)
    return new_state, {**metrics, 'on_policy': 0.0}

  train_iter = stage_data.train_iterator(data, ctx.tokenizer, cfg, seed=ctx.seed)
  state, history = loop.train_loop(
      ctx, state=state, step_fn=step_fn, data_iter=train_iter, total_steps=cfg.steps,
      checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every,
      tokens_per_step=cfg.batch_size * cfg.seq_len, batch_sharding=batch_sharding,
      eval_fn=evaluate.periodic_eval_fn(student, ctx.tokenizer, ctx.eval_records, cfg.eval,
                                        seed=ctx.seed),
      eval_every=cfg.eval.eval_every)
  checkpoint.save_params(os.path.join(ctx.stage_dir, 'final'), state['params'])
  checkpoint.write_model_meta(ctx.stage_dir, ctx.tokenizer, student.config)
  metrics = evaluate.evaluate(student, state['params'], ctx.tokenizer, ctx.eval_records,
                              cfg.eval, seed=ctx.seed, items_path=ctx.eval_items_path)
  metrics.update(_size_and_speed(student, state['params'], teacher, teacher_params,
                                 ctx.tokenizer, ctx.eval_records, cfg.eval))
  if pairs is not None:
    metrics.update({f'pairs/{k}': v for k, v in pairs.stats.items()})
  if rows := loop.train_rows(history):
    metrics.update({f'final_{k}': rows[-1][k] for k in
                    ('loss', 'ce', 'logit_kl', 'hidden', 'preference') if k in rows[-1]})
  return {'steps': cfg.steps, 'eval': metrics, 'history': history}


def _empty_pairs(count: int) -> dict[str, np.ndarray]:
  """Shape-stable stand-in when the preference level is off (never read)."""
  z = lambda dtype: np.zeros((count, 1), dtype)
  out = {}
  for side in ('chosen', 'rejected'):
    out.update({f'{side}_inputs': z(np.int32), f'{side}_targets': z(np.int32),
                f'{side}_positions': z(np.int32), f'{side}_mask': z(np.float32)})
    out[f'ref_{side}'] = np.zeros((count,), np.float32)
  return out


def init_from_teacher(student, teacher, teacher_params, layer_map) -> dict:
  """Student initialised from a subset of the teacher's layers (widths must match)."""
  s, t = student.config, teacher.config
  mismatched = [f for f in ('d_model', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                            'vocab_size', 'tie_embeddings', 'qkv_bias', 'qk_norm')
                if getattr(s, f) != getattr(t, f)]
  if mismatched:
    raise ValueError(f"init_from='teacher_layers' needs the student's widths to match the "
                     f"teacher's; they differ in {mismatched}")
  params = {k: v for k, v in teacher_params.items() if k != 'blocks'}
  params['blocks'] = {si - 1: teacher_params['blocks'][ti - 1] for si, ti in layer_map}
  return jax.device_put(params, student.param_shardings)


def _size_and_speed(student, s_params, teacher, t_params, tokenizer, records, eval_cfg):
  """Parameter counts and greedy sampling speed, student relative to teacher."""
  prompts = [render_prompt(stage_data.eval_input(r), tokenizer)
             for r in records if r['task'] != 'chat'][:eval_cfg.batch_size]
  cfg = sampling.SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens)
  speeds = {}
  for name, spec, params in (('student', student, s_params), ('teacher', teacher, t_params)):
    run = lambda: sampling.generate(spec, params, prompts, cfg, rng=jax.random.key(0),
                                    end_id=-1, pad_id=tokenizer.pad_id)  # never stops early
    run()  # compile
    t0 = time.perf_counter()
    out = run()
    speeds[name] = out.tokens.size / (time.perf_counter() - t0)
  return {'student_params': student.config.num_params(),
          'teacher_params': teacher.config.num_params(),
          'size_ratio': student.config.num_params() / teacher.config.num_params(),
          'student_tokens_per_s': speeds['student'], 'teacher_tokens_per_s': speeds['teacher'],
          'speedup': speeds['student'] / speeds['teacher']}
