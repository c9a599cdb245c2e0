"""The run's data: every stage's held-out items are disjoint from every
stage's training items, sources resolve by kind, bad configs name the key."""

import pytest

from configs import common, default
from pipeline import runner, stage_data


@pytest.fixture(scope='module')
def tiny_data():
  return runner.run_data(default.get_config('tiny'))


def test_no_heldout_item_appears_in_any_training_data(tiny_data):
  train, eval_ = tiny_data
  stage_data.check_no_leak(train, eval_)  # what the runner runs before training
  assert {r['task'] for r in eval_} >= {'basic_arithmetic', 'chain_sum', 'gcd', 'code_gen',
                                        'humaneval', 'chat', 'agent'}
  train_inputs = {str(stage_data.eval_input(r)) for r in train}
  assert not [r['id'] for r in eval_ if str(stage_data.eval_input(r)) in train_inputs]


def test_a_leak_is_caught(tiny_data):
  train, eval_ = tiny_data
  leaked = dict(eval_[0], id='copied-into-train')
  with pytest.raises(ValueError, match=r"1 evaluation items also appear in training.*"
                                       + eval_[0]['id'].replace('/', '.')):
    stage_data.check_no_leak(train + [leaked], eval_)


def test_generation_prompt_of_a_chat_ends_before_the_last_reply(tiny_data):
  _, eval_ = tiny_data
  chat = next(r for r in eval_ if r['task'] == 'chat')
  prompt = stage_data.generation_prompt(chat)
  assert prompt == chat['messages'][:len(prompt)]
  assert chat['messages'][len(prompt)]['role'] == 'assistant'
  assert all(m['role'] != 'assistant' for m in chat['messages'][len(prompt) + 1:])


def test_unknown_source_kind_names_the_key():
  cfg = default.get_config('tiny').stages[0].data
  cfg.sources.math.kind = 'gsm8k'
  with pytest.raises(ValueError, match=r"data.sources.math.kind='gsm8k' is unknown"):
    stage_data.load(cfg, seed=0)


def test_options_that_do_not_fit_the_source_name_the_key():
  cfg = default.get_config('tiny').stages[0].data
  cfg.sources.code = common.source('code_tasks', weight=0.2, train_size=4, eval_size=2,
                                   difficulty=3)
  with pytest.raises(ValueError, match=r"data.sources.code.options=.*difficulty"):
    stage_data.load(cfg, seed=0)
