"""Talk to a trained model: sample from any stage's final params.

  python -m pipeline.generate --workdir=runs/default --stage=overall_sft \
      --prompt="Calculate 12 + 7."
  python -m pipeline.generate --workdir=runs/default --stage=rl_stem   # interactive

The model config and tokenizer are the run's own (`config.json`,
`tokenizer/`), so nothing needs repeating on the command line.
"""

from __future__ import annotations

import jax
from absl import app, flags

from data.chat import render_prompt
from pipeline import runner, sampling

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run folder.', required=True)
_STAGE = flags.DEFINE_string('stage', None, 'Stage whose final params to load.', required=True)
_PROMPT = flags.DEFINE_string('prompt', None, 'One user message; omit for interactive mode.')
_SYSTEM = flags.DEFINE_string('system', None, 'Optional system message.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'Generation budget.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0 = greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Top-k filtering (0 = off).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Nucleus filtering (1 = off).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


class Chat:
  """A stage's policy with its tokenizer, answering user messages."""

  def __init__(self, workdir: str, stage: str):
    _, self.tokenizer, self.spec, self.params = runner.load_policy(workdir, stage)

  def reply(self, messages: list[dict], cfg: sampling.SamplingConfig, seed: int = 0) -> str:
    prompt = render_prompt(messages, self.tokenizer)
    out = sampling.generate(self.spec, self.params, [prompt], cfg, rng=jax.random.key(seed),
                            end_id=self.tokenizer.end_id, pad_id=self.tokenizer.pad_id)
    return self.tokenizer.decode(sampling.completion_ids(out, 0)[:out.lengths[0] -
                                                                  (not out.truncated[0])])


def main(argv):
  del argv
  chat = Chat(_WORKDIR.value, _STAGE.value)
  cfg = sampling.SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                top_k=_TOP_K.value, top_p=_TOP_P.value)
  history = [{'role': 'system', 'content': _SYSTEM.value}] if _SYSTEM.value else []
  if _PROMPT.value is not None:
    print(chat.reply(history + [{'role': 'user', 'content': _PROMPT.value}], cfg, _SEED.value))
    return
  print(f'{_STAGE.value}: type a message, empty line to quit.')
  while (text := input('> ').strip()):
    history.append({'role': 'user', 'content': text})
    answer = chat.reply(history, cfg, _SEED.value)
    history.append({'role': 'assistant', 'content': answer})
    print(answer)


if __name__ == '__main__':
  app.run(main)
