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
      data=ConfigDict(dict(sources=ConfigDict(sources), curriculum=tuple(curriculum))),
      eval=ConfigDict(dict(max_new_tokens=eval_max_new_tokens, batch_size=64,
                           max_chat_len=256)),
      checkpoint_every=max(steps // 4, 1), log_every=max(min(steps // 20, 50), 1)))


def base(seed: int = 0, vocab_size: int = 1024) -> ConfigDict:
  config = ConfigDict()
  config.seed = seed
  config.mesh = ConfigDict(dict(shape=(1, -1, 1), rules=DEFAULT_RULES))
  config.tokenizer = ConfigDict(dict(vocab_size=vocab_size))
  config.models = ConfigDict()
  config.stages = []
  return config


def lock(config: ConfigDict) -> ConfigDict:
  """Locks the config and every stage in its list (lock does not reach into
  lists): a mistyped override then fails and names the key."""
  for stage in config.stages:
    stage.lock()
  config.lock()
  return config


def distill_loss(*, ce_weight: float = 0.0, logit_weight: float = 1.0,
                 hidden_weight: float = 1.0, preference_weight: float = 0.5) -> ConfigDict:
  """Dual Preference Distillation weights (Nanbeige4-3B report §3.3).

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
  return stage
