"""Writes a stage's final params as a Hugging Face checkpoint.

  python -m pipeline.export_hf --workdir=runs/qwen --stage=rl_preference --out=/tmp/exported

The folder holds config.json (LlamaForCausalLM, Qwen2ForCausalLM or
Qwen3ForCausalLM, from the model's options), float32 safetensors (sharded
with an index past --max_shard_gb) and, when the run started from a Hugging
Face checkpoint, that checkpoint's tokenizer files and chat template, so
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer` load it. A
run that trained its own sentencepiece tokenizer gets `tokenizer.model` copied
beside the weights; transformers cannot use our chat template from it.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
from absl import app, flags, logging

from configs.common import DEFAULT_RULES
from data.hf_tokenizer import HFTokenizer, is_hf_tokenizer_dir
from models import hf
from models.llama import ModelConfig
from pipeline import checkpoint, sharding
from pipeline import state as state_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run folder.', required=True)
_STAGE = flags.DEFINE_string('stage', None, 'The stage whose final params to export.',
                             required=True)
_OUT = flags.DEFINE_string('out', None, 'The folder to write.', required=True)
_MAX_SHARD_GB = flags.DEFINE_float('max_shard_gb', 4.0, 'Largest safetensors file.')


def stage_model_config(stage_dir: str) -> ModelConfig:
  """The ModelConfig the stage trained, from its model_meta.json."""
  meta_path = os.path.join(stage_dir, checkpoint.META_FILE)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(f'{meta_path} not found: has stage {os.path.basename(stage_dir)!r} '
                            'finished? (every finished stage writes it beside final/)')
  with open(meta_path) as f:
    return ModelConfig(**json.load(f)['model'])


def export(workdir: str, stage: str, out: str, max_shard_bytes: int = 4 << 30) -> str:
  """Exports `workdir/stage/final` to `out`; returns `out`."""
  stage_dir = os.path.join(workdir, stage)
  final = os.path.join(stage_dir, 'final')
  if not os.path.isdir(final):
    stages = sorted(d for d in os.listdir(workdir)
                    if os.path.isdir(os.path.join(workdir, d, 'final')))
    raise FileNotFoundError(f'{final} does not exist; stages with final params: {stages}')
  cfg = stage_model_config(stage_dir)
  # Every local device: a large model is loaded FSDP-sharded, then written
  # one tensor at a time.
  mesh = sharding.make_mesh((1, -1, 1))
  spec = state_lib.model_spec(cfg, mesh, DEFAULT_RULES)
  with jax.set_mesh(mesh):
    params = checkpoint.load_params(final, state_lib.abstract_params(spec))
  tokenizer_dir = os.path.join(workdir, 'tokenizer')
  base = None
  if os.path.exists(os.path.join(tokenizer_dir, hf.CONFIG_FILE)):
    base = hf.read_config(tokenizer_dir)  # the source checkpoint's token ids etc.
  os.makedirs(out, exist_ok=True)
  if is_hf_tokenizer_dir(tokenizer_dir):
    # First: it copies the source's config.json, which save_pretrained replaces.
    HFTokenizer.load(tokenizer_dir).save(out)
  elif os.path.exists(os.path.join(tokenizer_dir, 'tokenizer.model')):
    shutil.copy(os.path.join(tokenizer_dir, 'tokenizer.model'), out)
    logging.warning('the run used its own sentencepiece tokenizer: copied tokenizer.model; '
                    'transformers will not apply our chat template')
  hf.save_pretrained(out, params, cfg, base_config=base, max_shard_bytes=max_shard_bytes)
  logging.info('exported %s/%s (%s) to %s', workdir, stage, hf.hf_config(cfg)['architectures'],
               out)
  return out


def main(argv):
  del argv
  export(_WORKDIR.value, _STAGE.value, _OUT.value,
         max_shard_bytes=int(_MAX_SHARD_GB.value * (1 << 30)))


if __name__ == '__main__':
  app.run(main)
