"""Dual Preference Distillation losses (Nanbeige4-3B report, stage 3).

Three levels, each a pure function of arrays and masks so a stage can weigh or
switch off each one:

- logit level, `logit_kl`: KL between the teacher's and the student's
  next-token distributions at temperature τ, scaled by τ² (Hinton et al. 2015:
  keeps gradient magnitudes comparable across τ); forward, reverse or the
  generalised JSD(β) of GKD (Agarwal et al. 2024).
- hidden-state level, `hidden_state_loss`: MSE or cosine distance between
  W·h_S and h_T over a student→teacher layer map, W a learned d_S→d_T
  projection.
- preference level, `preference_distillation_loss`: the token-level KL on both
  y⁺ (teacher's answer) and y⁻ (student's worse answer) plus the DPO term
  `dpo_loss` against the frozen reference student.

Every token loss is summed over the masked tokens of the whole batch and divided
by their count (or by `normalizer` under gradient accumulation), like
`losses.ce.masked_cross_entropy`; an all-masked batch gives 0, not NaN. The
teacher (and the reference) get no gradient: each loss applies stop_gradient
to them itself, so a caller cannot forget it. Hyperparameters (τ, β, top_k,
direction, layer map) are Python values, checked when the function is called
or traced.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from losses.ce import token_log_probs

DIRECTIONS = ('forward', 'reverse', 'jsd')
HIDDEN_KINDS = ('mse', 'cosine')
_COS_EPS = 1e-8


def _denominator(num: jax.Array, normalizer) -> jax.Array:
  """num guarded to >= 1 (empty batch → loss 0), or the caller's normalizer."""
  return jnp.maximum(num, 1.0) if normalizer is None else normalizer


def _kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p || q) = Σ_v p (log p - log q) over the last axis, in float32.

  Entries with p = 0 contribute 0, so a -inf logit in p (a banned token, a
  token outside the teacher's top-k) does not turn 0·(-inf) into NaN.
  """
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _entropy(log_p: jax.Array) -> jax.Array:
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_positive(name: str, value) -> None:
  if not _is_number(value) or not value > 0 or not math.isfinite(value):
    raise ValueError(f'{name} must be a finite Python number > 0, got {value!r}')


def logit_kl(student_logits_btv: jax.Array, teacher_logits_btv: jax.Array, mask_bt: jax.Array,
             *, temperature: float = 1.0, direction: str = 'forward', beta: float = 0.5,
             top_k: int = 0, normalizer: jax.Array | float | None = None):
  """Token-level distillation divergence at temperature τ, scaled by τ².

  With p_T = softmax(teacher / τ) and p_S = softmax(student / τ) per token:
    forward: KL(p_T || p_S)  (standard KD; mode-covering)
    reverse: KL(p_S || p_T)  (mode-seeking)
    jsd:     β·KL(p_T || m) + (1-β)·KL(p_S || m), m = β·p_T + (1-β)·p_S
             (GKD's generalised JSD(β), Agarwal et al. 2024). Near β → 0 it is
             ≈ β·KL(p_T || p_S) (forward KL scaled by β); near β → 1 it is
             ≈ (1-β)·KL(p_S || p_T) (reverse KL scaled by 1-β); β = 0.5 is the
             symmetric Jensen-Shannon divergence. At β = 0 or 1 exactly it is
             identically 0, so those values are rejected: use 'forward' or
             'reverse' for the limits.

  top_k > 0 keeps only the teacher's k most likely tokens per position: p_T is
  renormalised over them and p_S is the student's distribution renormalised
  over the same k tokens. Renormalising both keeps every direction a divergence
  between two distributions on one support (reverse KL and JSD would otherwise
  be infinite or ill-defined where the truncated teacher has zero mass), and
  the student is not pushed on tokens the teacher ranks below k.

  Args:
    student_logits_btv: [B, T, V] student next-token logits (gets gradient).
    teacher_logits_btv: [B, T, V] teacher logits on the same tokens; same
      tokenizer, so same V. stop_gradient is applied here.
    mask_bt: [B, T] 1 on the response tokens of real rows, 0 elsewhere.
    temperature: τ > 0, applied to both distributions.
    direction: 'forward' | 'reverse' | 'jsd'.
    beta: JSD's β in (0, 1); ignored by the other directions.
    top_k: 0 = full vocabulary; 0 < k <= V = the teacher's top-k tokens.
    normalizer: divide the summed loss by this instead of the masked token
      count (gradient accumulation passes the full batch's count).

  Returns:
    (loss, metrics): loss = τ² · Σ_masked divergence / num_tokens. metrics:
    'loss', 'loss_sum', 'num_tokens', 'teacher_entropy' (mean over masked
    tokens of the entropy of the target p_T, i.e. after τ and top-k) and
    'teacher_entropy_sum'. Sums add up across micro-batches; means do not.
  """
  if student_logits_btv.ndim != 3:
    raise ValueError(f'student logits must be [B, T, V], got shape {student_logits_btv.shape}')
  if teacher_logits_btv.shape != student_logits_btv.shape:
    s, t = student_logits_btv.shape, teacher_logits_btv.shape
    hint = (' (different vocabulary sizes: teacher and student must share the tokenizer)'
            if s[:2] == t[:2] else '')
    raise ValueError(f'teacher logits {t} must have the student logits\' shape {s}{hint}')
  if mask_bt.shape != student_logits_btv.shape[:2]:
    raise ValueError(f'mask {mask_bt.shape} must be logits.shape[:2] = '
                     f'{student_logits_btv.shape[:2]}')
  _check_positive('temperature', temperature)
  if direction not in DIRECTIONS:
    raise ValueError(f'direction must be one of {DIRECTIONS}, got {direction!r}')
  if direction == 'jsd' and not (_is_number(beta) and 0.0 < beta < 1.0):
    raise ValueError(f'jsd beta must be in (0, 1), got {beta!r} (JSD(β) is identically 0 at '
                     "β = 0 and 1; use direction='forward' or 'reverse' for those limits)")
  vocab = student_logits_btv.shape[-1]
  if not _is_int(top_k) or not 0 <= top_k <= vocab:
    raise ValueError(f'top_k must be an int in [0, vocab size {vocab}], got {top_k!r}')

  s_btv = student_logits_btv.astype(jnp.float32) / temperature
  t_btv = jax.lax.stop_gradient(teacher_logits_btv).astype(jnp.float32) / temperature
  top_k = int(top_k)
  if 0 < top_k < vocab:
    t_btv, top_btk = jax.lax.top_k(t_btv, top_k)  # [B, T, K] values and vocab ids
    s_btv = jnp.take_along_axis(s_btv, top_btk, axis=-1)  # [B, T, K]
  log_ps = jax.nn.log_softmax(s_btv, axis=-1)
  log_pt = jax.nn.log_softmax(t_btv, axis=-1)

  if direction == 'forward':
    div_bt = _kl_from_log_probs(log_pt, log_ps)
  elif direction == 'reverse':
    div_bt = _kl_from_log_probs(log_ps, log_pt)
  else:
    log_m = jnp.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
    div_bt = beta * _kl_from_log_probs(log_pt, log_m) + \
        (1.0 - beta) * _kl_from_log_probs(log_ps, log_m)
  div_bt = temperature ** 2 * div_bt

  mask = mask_bt.astype(jnp.float32)
  num_tokens = jnp.sum(mask)
  loss_sum = jnp.sum(div_bt * mask)
  entropy_sum = jnp.sum(_entropy(log_pt) * mask)
  loss = loss_sum / _denominator(num_tokens, normalizer)
  metrics = {'loss': loss, 'loss_sum': loss_sum, 'num_tokens': num_tokens,
             'teacher_entropy': entropy_sum / jnp.maximum(num_tokens, 1.0),
             'teacher_entropy_sum': entropy_sum}
  return loss, metrics


def uniform_layer_map(num_student_layers: int, num_teacher_layers: int,
                      include_embeddings: bool = False) -> tuple[tuple[int, int], ...]:
  """Student→teacher pairs of hidden-state indices, spread uniformly.

  Indices are into the hidden-state lists of `models.llama` (return_hidden):
  L + 1 entries, the embedding output at 0 and block l's output at l. Student
  block i (1..L_S) maps to teacher round(i · L_T / L_S), halves rounding up,
  so the last student block meets the last teacher block. A block output is
  never mapped to the teacher's embedding output: the index is at least 1
  (this matters only when L_S > 2·L_T). include_embeddings prepends (0, 0).

  Example: uniform_layer_map(2, 4) == ((1, 2), (2, 4)).
  """
  for name, n in (('num_student_layers', num_student_layers),
                  ('num_teacher_layers', num_teacher_layers)):
    if not _is_int(n) or n < 1:
      raise ValueError(f'{name} must be an int >= 1, got {n!r}')
  ls, lt = int(num_student_layers), int(num_teacher_layers)
  # round-half-up in integers: floor(i·L_T/L_S + 1/2)
  pairs = tuple((i, max(1, (2 * i * lt + ls) // (2 * ls))) for i in range(1, ls + 1))
  return ((0, 0),) + pairs if include_embeddings else pairs


def hidden_state_loss(student_hidden: Sequence[jax.Array], teacher_hidden: Sequence[jax.Array],
                      projection_dst: jax.Array, mask_bt: jax.Array, *,
                      layer_map: Sequence[tuple[int, int]], kind: str = 'mse',
                      normalizer: jax.Array | float | None = None):
  """Hidden-state distillation: distance between W·h_S and h_T over a layer map.

  For each pair (i, j) of layer_map and each masked token, with x = h_S[i] W
  ([d_T]) and y = stop_gradient(h_T[j]):
    mse:    mean over the d_T features of (x - y)²
    cosine: 1 - x·y / (|x| |y|)   (each norm floored at 1e-8, so a zero
            vector, e.g. a zero-initialised W, gives cos 0 and finite gradients)
  averaged over the pairs and over the masked tokens of the whole batch.

  Args:
    student_hidden: L_S + 1 arrays [B, T, d_S] (embedding output, then blocks).
    teacher_hidden: L_T + 1 arrays [B, T, d_T]; stop_gradient is applied here.
    projection_dst: W, [d_S, d_T] shared by all pairs, or [M, d_S, d_T] with
      one projection per pair (M = len(layer_map)). Trained with the student.
    mask_bt: [B, T] 1 on the response tokens of real rows.
    layer_map: (student index, teacher index) pairs, e.g. `uniform_layer_map`.
    kind: 'mse' | 'cosine'.
    normalizer: divide the summed loss by this instead of the token count.

  Returns:
    (loss, metrics): metrics 'loss', 'loss_sum' (Σ over tokens of the
    pair-mean), 'num_tokens', and 'pair_s{i}_t{j}' (that pair's mean over the
    masked tokens).
  """
  if kind not in HIDDEN_KINDS:
    raise ValueError(f'kind must be one of {HIDDEN_KINDS}, got {kind!r}')
  n_s, n_t = len(student_hidden), len(teacher_hidden)
  if n_s == 0 or n_t == 0:
    raise ValueError(f'need hidden states from both models, got {n_s} student and '
                     f'{n_t} teacher arrays')
  layer_map = tuple(layer_map)
  if not layer_map:
    raise ValueError('layer_map is empty: give at least one (student, teacher) pair, '
                     'e.g. uniform_layer_map(L_S, L_T)')
  for pair in layer_map:
    ok = (isinstance(pair, (tuple, list)) and len(pair) == 2 and
          all(_is_int(k) for k in pair))
    if not ok or not (0 <= pair[0] < n_s and 0 <= pair[1] < n_t):
      raise ValueError(f'bad layer_map pair {pair!r}: need (student, teacher) int indices with '
                       f'student in [0, {n_s - 1}] and teacher in [0, {n_t - 1}] '
                       f'({n_s} student and {n_t} teacher hidden states)')
  shape_s, shape_t = tuple(student_hidden[0].shape), tuple(teacher_hidden[0].shape)
  for name, hs, shape in (('student', student_hidden, shape_s),
                          ('teacher', teacher_hidden, shape_t)):
    for k, h in enumerate(hs):
      if h.ndim != 3 or tuple(h.shape) != shape:
        raise ValueError(f'{name} hidden state {k} has shape {h.shape}; all must be [B, T, D] '
                         f'with the shape of entry 0, {shape}')
  if shape_s[:2] != shape_t[:2] or tuple(mask_bt.shape) != shape_s[:2]:
    raise ValueError(f'student hidden {shape_s}, teacher hidden {shape_t} and mask '
                     f'{mask_bt.shape} must share [B, T]')
  d_s, d_t, m = shape_s[2], shape_t[2], len(layer_map)
  if tuple(projection_dst.shape) not in ((d_s, d_t), (m, d_s, d_t)):
    raise ValueError(f'projection has shape {projection_dst.shape}; expected [d_S, d_T] = '
                     f'{(d_s, d_t)} or one per layer pair [M, d_S, d_T] = {(m, d_s, d_t)}')

  w = projection_dst.astype(jnp.float32)
  mask = mask_bt.astype(jnp.float32)
  num_tokens = jnp.sum(mask)
  per_pair_bt = []
  for p, (i, j) in enumerate(layer_map):
    w_de = w if w.ndim == 2 else w[p]
    x_bte = jnp.einsum('btd,de->bte', student_hidden[i].astype(jnp.float32), w_de)  # [B, T, d_T]
    y_bte = jax.lax.stop_gradient(teacher_hidden[j]).astype(jnp.float32)
    if kind == 'mse':
      per_pair_bt.append(jnp.mean(jnp.square(x_bte - y_bte), axis=-1))
    else:
      # Norms floored separately (not |x||y| jointly) so d/dx stays finite at x = 0.
      inv_x = jax.lax.rsqrt(jnp.maximum(jnp.sum(x_bte * x_bte, -1), _COS_EPS ** 2))
      inv_y = jax.lax.rsqrt(jnp.maximum(jnp.sum(y_bte * y_bte, -1), _COS_EPS ** 2))
      per_pair_bt.append(1.0 - jnp.sum(x_bte * y_bte, -1) * inv_x * inv_y)
  per_pair_mbt = jnp.stack(per_pair_bt)  # [M, B, T]
  pair_sums_m = jnp.sum(per_pair_mbt * mask, axis=(1, 2))
  loss_sum = jnp.sum(pair_sums_m) / m
  loss = loss_sum / _denominator(num_tokens, normalizer)
  metrics = {'loss': loss, 'loss_sum': loss_sum, 'num_tokens': num_tokens}
  for (i, j), s in zip(layer_map, pair_sums_m):
    metrics[f'pair_s{i}_t{j}'] = s / jnp.maximum(num_tokens, 1.0)
  return loss, metrics


def sequence_log_probs(logits_btv: jax.Array, targets_bt: jax.Array,
                       mask_bt: jax.Array) -> jax.Array:
  """log π(y | x) per row: Σ_t mask · log p(target_t), float32 [B]."""
  if logits_btv.ndim != 3:
    raise ValueError(f'logits must be [B, T, V], got shape {logits_btv.shape}')
  if targets_bt.shape != logits_btv.shape[:2] or mask_bt.shape != targets_bt.shape:
    raise ValueError(f'targets {targets_bt.shape} and mask {mask_bt.shape} must both '
                     f'be logits.shape[:2] = {logits_btv.shape[:2]}')
  return jnp.sum(token_log_probs(logits_btv, targets_bt) * mask_bt.astype(jnp.float32), axis=-1)


def dpo_loss(policy_chosen_logp_b: jax.Array, policy_rejected_logp_b: jax.Array,
             ref_chosen_logp_b: jax.Array, ref_rejected_logp_b: jax.Array, *, beta: float,
             row_mask_b: jax.Array | None = None,
             normalizer: jax.Array | float | None = None):
  """DPO (Rafailov et al. 2023): -log σ(β[(π_c - ref_c) - (π_r - ref_r)]).

  Inputs are sequence log-probs (`sequence_log_probs`); the reference's get
  stop_gradient here (π_ref is frozen). The mean is over real pairs.

  Args:
    policy_chosen_logp_b, policy_rejected_logp_b: [B] log π(y⁺), log π(y⁻).
    ref_chosen_logp_b, ref_rejected_logp_b: [B] log π_ref(y⁺), log π_ref(y⁻).
    beta: β > 0, the implicit reward scale.
    row_mask_b: [B] 1 for real pairs, 0 for padding rows; None = all real.
    normalizer: divide the summed loss by this instead of the pair count.

  Returns:
    (loss, metrics): 'loss', 'loss_sum', 'num_pairs', and means over real
    pairs of 'reward_chosen' β(π_c - ref_c), 'reward_rejected' β(π_r - ref_r),
    'reward_margin' (their difference) and 'reward_accuracy' (fraction with
    margin > 0).
  """
  _check_positive('beta', beta)
  shape = policy_chosen_logp_b.shape
  arrays = {'policy_chosen': policy_chosen_logp_b, 'policy_rejected': policy_rejected_logp_b,
            'ref_chosen': ref_chosen_logp_b, 'ref_rejected': ref_rejected_logp_b}
  if row_mask_b is not None:
    arrays['row_mask'] = row_mask_b
  if len(shape) != 1 or any(a.shape != shape for a in arrays.values()):
    raise ValueError('DPO inputs must all be [B] with the same B, got ' +
                     ', '.join(f'{k} {a.shape}' for k, a in arrays.items()))
  f32 = jnp.float32
  mask = jnp.ones(shape, f32) if row_mask_b is None else row_mask_b.astype(f32)
  reward_c = beta * (policy_chosen_logp_b.astype(f32) -
                     jax.lax.stop_gradient(ref_chosen_logp_b).astype(f32))
  reward_r = beta * (policy_rejected_logp_b.astype(f32) -
                     jax.lax.stop_gradient(ref_rejected_logp_b).astype(f32))
  margin_b = reward_c - reward_r
  # Padding rows may carry garbage log-probs: select, don't multiply, so an
  # inf there cannot become NaN (0 · inf) in the loss or its gradient.
  margin_b = jnp.where(mask > 0, margin_b, 0.0)
  num_pairs = jnp.sum(mask)
  loss_sum = jnp.sum(-jax.nn.log_sigmoid(margin_b) * mask)
  loss = loss_sum / _denominator(num_pairs, normalizer)
  mean = lambda x: jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / jnp.maximum(num_pairs, 1.0)
  metrics = {'loss': loss, 'loss_sum': loss_sum, 'num_pairs': num_pairs,
             'reward_chosen': mean(reward_c), 'reward_rejected': mean(reward_r),
             'reward_margin': mean(margin_b),
             'reward_accuracy': mean((margin_b > 0).astype(f32))}
  return loss, metrics


def preference_distillation_loss(
    *, student_chosen_logits_btv: jax.Array, teacher_chosen_logits_btv: jax.Array,
    chosen_targets_bt: jax.Array, chosen_mask_bt: jax.Array,
    student_rejected_logits_btv: jax.Array, teacher_rejected_logits_btv: jax.Array,
    rejected_targets_bt: jax.Array, rejected_mask_bt: jax.Array,
    ref_chosen_logp_b: jax.Array, ref_rejected_logp_b: jax.Array,
    beta: float, temperature: float = 1.0, kl_weight: float = 1.0, dpo_weight: float = 1.0,
    direction: str = 'forward', jsd_beta: float = 0.5, top_k: int = 0,
    row_mask_b: jax.Array | None = None,
    kl_normalizer: jax.Array | float | None = None,
    dpo_normalizer: jax.Array | float | None = None):
  """The DPD preference level: token KL on y⁺ and y⁻ plus DPO against π_ref.

    loss = kl_weight · KL_τ(teacher ‖ student on y⁺ and y⁻ tokens)
         + dpo_weight · -log σ(β[(log π(y⁺) - log π_ref(y⁺))
                                   - (log π(y⁻) - log π_ref(y⁻))])

  π is the student (its sequence log-probs come from the student logits at
  τ = 1), π_ref the frozen student from the start of the stage. The KL term is
  one token mean over the masked tokens of y⁺ and y⁻ together, so every token
  weighs the same whichever sequence it is in. Arguments are keyword-only:
  ten arrays of similar shapes are too easy to pass in the wrong order.

  Args:
    student_chosen_logits_btv, teacher_chosen_logits_btv: [B, T, V] on y⁺.
    chosen_targets_bt, chosen_mask_bt: [B, T] next-token ids and response mask of y⁺.
    student_rejected_logits_btv, teacher_rejected_logits_btv: [B, T', V] on y⁻.
    rejected_targets_bt, rejected_mask_bt: [B, T'] for y⁻.
    ref_chosen_logp_b, ref_rejected_logp_b: [B] log π_ref(y⁺), log π_ref(y⁻).
    beta: DPO β > 0.
    temperature, direction, jsd_beta, top_k: passed to `logit_kl` (τ, β_JSD, k).
    kl_weight, dpo_weight: >= 0 weights of the two terms (0 switches one off).
    row_mask_b: [B] 1 for real pairs; also zeroes the token masks of padding rows.
    kl_normalizer: token count to divide the KL sum by (gradient accumulation).
    dpo_normalizer: pair count to divide the DPO sum by.

  Returns:
    (loss, metrics): 'loss', 'kl', 'dpo', 'kl_chosen', 'kl_rejected' (per-side
    token means), 'num_tokens_chosen', 'num_tokens_rejected', 'kl_sum',
    'teacher_entropy', and the DPO metrics prefixed 'dpo_' ('dpo_reward_margin',
    'dpo_reward_accuracy', 'dpo_reward_chosen', 'dpo_reward_rejected',
    'dpo_num_pairs', 'dpo_loss_sum').
  """
  for name, w in (('kl_weight', kl_weight), ('dpo_weight', dpo_weight)):
    if not _is_number(w) or not (w >= 0 and math.isfinite(w)):
      raise ValueError(f'{name} must be a finite Python number >= 0, got {w!r}')
  b = student_chosen_logits_btv.shape[0]
  if student_rejected_logits_btv.shape[:1] != (b,):
    raise ValueError(f'chosen logits {student_chosen_logits_btv.shape} and rejected logits '
                     f'{student_rejected_logits_btv.shape} must have the same number of rows B')
  if row_mask_b is not None:
    if row_mask_b.shape != (b,):
      raise ValueError(f'row_mask must be [B] = ({b},), got {row_mask_b.shape}')
    chosen_mask_bt = chosen_mask_bt * row_mask_b[:, None].astype(chosen_mask_bt.dtype)
    rejected_mask_bt = rejected_mask_bt * row_mask_b[:, None].astype(rejected_mask_bt.dtype)

  kl_args = dict(temperature=temperature, direction=direction, beta=jsd_beta, top_k=top_k,
                 normalizer=1.0)
  _, kl_c = logit_kl(student_chosen_logits_btv, teacher_chosen_logits_btv, chosen_mask_bt,
                     **kl_args)
  _, kl_r = logit_kl(student_rejected_logits_btv, teacher_rejected_logits_btv, rejected_mask_bt,
                     **kl_args)
  kl_sum = kl_c['loss_sum'] + kl_r['loss_sum']
  num_tokens = kl_c['num_tokens'] + kl_r['num_tokens']
  kl = kl_sum / _denominator(num_tokens, kl_normalizer)

  policy_c = sequence_log_probs(student_chosen_logits_btv, chosen_targets_bt, chosen_mask_bt)
  policy_r = sequence_log_probs(student_rejected_logits_btv, rejected_targets_bt,
                                rejected_mask_bt)
  dpo, dpo_m = dpo_loss(policy_c, policy_r, ref_chosen_logp_b, ref_rejected_logp_b, beta=beta,
                        row_mask_b=row_mask_b, normalizer=dpo_normalizer)

  loss = kl_weight * kl + dpo_weight * dpo
  metrics = {'loss': loss, 'kl': kl, 'dpo': dpo, 'kl_sum': kl_sum,
             'kl_chosen': kl_c['loss_sum'] / jnp.maximum(kl_c['num_tokens'], 1.0),
             'kl_rejected': kl_r['loss_sum'] / jnp.maximum(kl_r['num_tokens'], 1.0),
             'num_tokens_chosen': kl_c['num_tokens'], 'num_tokens_rejected': kl_r['num_tokens'],
             'teacher_entropy': (kl_c['teacher_entropy_sum'] + kl_r['teacher_entropy_sum']) /
                                jnp.maximum(num_tokens, 1.0)}
  metrics.update({f'dpo_{k}': v for k, v in dpo_m.items() if k != 'loss'})
  return loss, metrics
