"""Shared config pieces: plain functions returning ConfigDicts."""

from __future__ import annotations

from ml_collections import ConfigDict

# Logical axis -> mesh axes. FSDP shards every weight's 'embed' dimension;
# tensor parallelism splits heads and the MLP width.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
)


def model(*, d_model: int, num_layers: int, num_heads: int, num_kv_heads: int,
          mlp_dim: int, head_dim: int | None = None, **extra) -> ConfigDict:
  """A models.llama.ModelConfig's fields (vocab_size comes from the tokenizer)."""
  return ConfigDict(dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim or d_model // num_heads,
                         mlp_dim=mlp_dim, rope_theta=10_000.0, tie_embeddings=True,
                         dtype='float32', remat=False, **extra))


def optim(*, lr: float = 1e-3, warmup_steps: int = 20, schedule: str = 'cosine',
          weight_decay: float = 0.01) -> ConfigDict:
  """AdamW (Loshchilov & Hutter) with clipping; schedule 'cosine' | 'wsd' | 'constant'."""
  return ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule=schedule,
                         min_lr_ratio=0.1, decay_fraction=0.2, b1=0.9, b2=0.95, eps=1e-8,
                         weight_decay=weight_decay, grad_clip=1.0))


def source(kind: str, *, weight: float, train_size: int, eval_size: int,
           **options) -> ConfigDict:
  """One data source of a stage's mixture (see pipeline/stage_data.py for the
  kinds). weight: its share of the stage's training records; train_size and
  eval_size: records drawn per split; options: the kind's make_records kwargs."""
  return ConfigDict(dict(kind=kind, weight=weight, train_size=train_size,
                         eval_size=eval_size, options=ConfigDict(options)))


def sft_stage(name: str, *, model: str, steps: int, batch_size: int, seq_len: int,
              sources: dict, curriculum=(), lr: float = 1e-3, init_from: str = 'previous',
              eval_max_new_tokens: int = 64) -> ConfigDict:
  """An SFT stage.

  init_from: 'previous' (the last earlier stage of the same model, or scratch
  if none), 'scratch', or a params checkpoint folder. curriculum: pairs
  (fraction of the stage, max difficulty level), e.g. ((0, 0), (0.3, 1)).
  """
  return ConfigDict(dict(
      name=name, kind='sft', model=model, init_from=init_from,
      steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=1,
      optim=optim(lr=lr, warmup_steps=max(steps // 20, 1)),
      # shards: the global batch is this many equal slices, each read from its
      # own shard of the records (0 = one per process). Fix it to get the same
      # batches whatever the number of processes that load them.
      data=ConfigDict(dict(sources=ConfigDict(sources), curriculum=tuple(curriculum),
                           shards=0)),
      # during_training: held-out records scored every eval_every steps (0 = off).
      # samples: k > 0 also scores k completions per math and code item sampled
      # at `temperature` (avg@k: pass@1 as the report and RL measure it).
      eval=ConfigDict(dict(max_new_tokens=eval_max_new_tokens, batch_size=64,
                           max_chat_len=256, during_training=0, eval_every=0,
                           samples=0, temperature=0.5)),
      checkpoint_every=max(steps // 4, 1), log_every=max(min(steps // 20, 50), 1)))


def base(seed: int = 0, vocab_size: int = 1024) -> ConfigDict:
  config = ConfigDict()
  config.seed = seed
  config.mesh = ConfigDict(dict(shape=(1, -1, 1), rules=DEFAULT_RULES))
  config.tokenizer = ConfigDict(dict(vocab_size=vocab_size))
  config.models = ConfigDict()
  config.stages = []
  config.stop_after = ''  # a stage name: run the stages up to it only ('' = all)
  config.eval_untrained = True  # score the first stage's model at init: the baseline row
  return config


def lock(config: ConfigDict) -> ConfigDict:
  """Locks the config and every stage in its list (lock does not reach into
  lists): a mistyped override then fails and names the key."""
  for stage in config.stages:
    stage.lock()
  config.lock()
  return config


def distill_loss(*, ce_weight: float = 1.0, logit_weight: float = 1.0,
                 hidden_weight: float = 0.1, preference_weight: float = 0.5) -> ConfigDict:
  """Dual Preference Distillation weights (Nanbeige4-3B report §3.3).

  Defaults: the levels on top of cross-entropy on the data's responses. With
  ce_weight=0 and hidden_weight=1 a 0.2M student from scratch reached 9% math
  accuracy against the teacher's 43% in 500 steps (the hidden MSE, ~5x the
  KL, dominated the loss).

  temperature: τ of the logit KL (the loss is scaled by τ²); direction:
  'forward' KL(p_T||p_S) | 'reverse' | 'jsd' with jsd_beta β (GKD); top_k: use
  only the teacher's top-k tokens (0 = all); hidden_kind: 'mse' | 'cosine';
  layer_map: ((student hidden index, teacher hidden index), ...), () = uniform;
  dpo_beta: β of the DPO term; pref_kl_weight: token KL on y⁺ and y⁻.
  """
  return ConfigDict(dict(ce_weight=ce_weight, logit_weight=logit_weight,
                         hidden_weight=hidden_weight, preference_weight=preference_weight,
                         temperature=1.0, direction='forward', jsd_beta=0.5, top_k=0,
                         hidden_kind='mse', layer_map=(), dpo_beta=0.1, pref_kl_weight=1.0))


def distill_stage(name: str, *, model: str, teacher: str, steps: int, batch_size: int,
                  seq_len: int, sources: dict, curriculum=(), lr: float = 2e-3,
                  init_from: str = 'scratch', num_pair_prompts: int = 256,
                  eval_max_new_tokens: int = 64) -> ConfigDict:
  """A distillation stage: `teacher` (trained by an earlier stage, or
  `teacher_from` a params folder) into `model`. init_from: 'scratch',
  'previous', 'teacher_layers' (widths must match) or a params folder."""
  stage = sft_stage(name, model=model, steps=steps, batch_size=batch_size, seq_len=seq_len,
                    sources=sources, curriculum=curriculum, lr=lr, init_from=init_from,
                    eval_max_new_tokens=eval_max_new_tokens)
  stage.kind = 'distill'
  stage.teacher = teacher
  stage.teacher_from = ''
  stage.loss = distill_loss()
  # Preference pairs: y⁺ sampled from the teacher, y⁻ from the student.
  stage.pairs = ConfigDict(dict(num_prompts=num_pair_prompts, max_new_tokens=eval_max_new_tokens,
                                temperature=1.0, seq_len=seq_len, per_step=8))
  # GKD's λ: the fraction of steps that train on the student's own samples,
  # scored by the teacher (0 = off, the default: supervised distillation).
  stage.on_policy = ConfigDict(dict(fraction=0.0, max_new_tokens=eval_max_new_tokens,
                                    temperature=1.0))
  return stage


def grpo_stage(name: str, *, model: str, steps: int, sources: dict, rewards: dict,
               prompts_per_step: int = 8, group_size: int = 8, max_new_tokens: int = 128,
               seq_len: int = 256, lr: float = 2e-4, filter_k: int = 16,
               filter_candidates: int = 256, reward_model: str = '',
               eval_max_new_tokens: int | None = None) -> ConfigDict:
  """A GRPO stage (Shao et al. 2024) with DAPO's choices as in the report:
  no KL (β = 0), clip-higher, token-mean loss, truncated completions masked,
  the pass-rate band filter before the stage and dynamic sampling during it.

  rewards: {function name: weight} (pipeline/rewards.py; 'preference' needs
  `reward_model`, the name of an earlier reward_model stage).
  eval_max_new_tokens: the held-out suite's budget (default max_new_tokens);
  it must equal the other stages' (runner.validate).
  """
  stage = sft_stage(name, model=model, steps=steps, batch_size=prompts_per_step * group_size,
                    seq_len=seq_len, sources=sources, lr=lr,
                    eval_max_new_tokens=eval_max_new_tokens or max_new_tokens)
  stage.kind = 'grpo'
  stage.optim.schedule = 'constant'
  stage.optim.weight_decay = 0.0
  stage.prompts_per_step = prompts_per_step  # P prompts, each sampled G times
  stage.reward_model = reward_model
  stage.grpo = ConfigDict(dict(
      group_size=group_size,  # G
      num_iterations=1,  # μ: updates per rollout batch (old log-probs reused)
      epsilon_low=0.2, epsilon_high=0.28,  # ε_low, ε_high (DAPO clip-higher)
      beta=0.0,  # β of the k3 KL to the reference; 0 keeps no reference model
      scale_rewards='group',  # 'group' | 'batch' | 'none' (Dr. GRPO)
      negative_weight=1.0,  # scales negative advantages; 0 reinforces only the successes
      loss_agg='token_mean',  # DAPO; or 'seq_mean_token_mean' (GRPO), 'seq_mean_token_sum_norm'
      temperature=1.0, max_new_tokens=max_new_tokens,
      sft_coef=0.0,  # λ: + λ·CE on the sources' reference answers (PPO-ptx anchor)
      greedy_in_group=False))  # each group's first completion greedy, G - 1 sampled at T
  stage.sampling = ConfigDict(dict(top_k=0, top_p=1.0))
  stage.max_sampling_rounds = 3  # dynamic sampling: extra rollouts to replace zero-variance groups
  stage.dynamic_sampling = True
  # Keep prompts solved in [low, high] of k samples (the report: 10%..90% of 16).
  stage.filter = ConfigDict(dict(enabled=True, k=filter_k, low=0.1, high=0.9,
                                 num_candidates=filter_candidates, batch_prompts=16,
                                 functions=('stem', 'sound_stem', 'code', 'agent')))
  stage.rewards = ConfigDict(dict(functions=ConfigDict(rewards), timeout_s=10.0,
                                  max_new_tokens=max_new_tokens,
                                  overlong_buffer=max(max_new_tokens // 4, 1)))
  return stage


def reward_model_stage(name: str, *, model: str, steps: int, batch_size: int, seq_len: int,
                       sources: dict, lr: float = 1e-3, init_from: str = 'previous',
                       min_rating_gap: float = 3.0, pairs_per_record: int = 1) -> ConfigDict:
  """A Bradley-Terry reward model: `model`'s backbone plus a scalar head
  (pipeline/reward_model.py). batch_size: preference pairs per step; seq_len:
  tokens per side (longer sides keep their end). sources: kinds 'chat'
  (chitchat ratings) and 'reasoning_gym' (reference vs a wrong answer).
  pairs.min_rating_gap: Δ, the least rating difference (1..10) of two
  conversations for a chat pair; pairs.per_record: partners per conversation.
  """
  stage = sft_stage(name, model=model, steps=steps, batch_size=batch_size, seq_len=seq_len,
                    sources=sources, lr=lr, init_from=init_from)
  stage.kind = 'reward_model'
  stage.eval = ConfigDict(dict(batch_size=64))
  stage.pairs = ConfigDict(dict(min_rating_gap=min_rating_gap, per_record=pairs_per_record))
  return stage
