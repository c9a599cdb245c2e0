"""Tool-use traces from the Berkeley Function Calling Leaderboard (bfcl-eval).

A record is
    {"id": "agent/simple/simple_python_0", "task": "agent", "category": "simple",
     "bfcl_id": "simple_python_0",
     "tools": [schema, ...],
     "accepted_calls": [{"name": "f", "arguments": {"x": [10], "unit": ["units", ""]}}],
     "ordered": False,
     "messages": [{"role": "system", "content": SYSTEM_PREFIX + compact tools JSON},
                  {"role": "user", "content": question},
                  {"role": "assistant", "content": '<tool_call>{"name": "f", "arguments": {"x": 10}}</tool_call>'},
                  ...]}

Two kinds of category:

- Single-turn AST categories ('simple' = BFCL_v4_simple_python, 'parallel',
  'multiple', 'parallel_multiple'): bfcl ships no implementation of these
  functions, so the trace ENDS at the assistant's tool call(s). The possible
  answers give, per argument, every accepted value ("" = may be omitted); the
  reference call takes the first accepted value of each argument.
- 'multi_turn_base' (executed): the first user turn of each BFCL multi-turn
  task, whose tools are bfcl's own Python back ends (GorillaFileSystem,
  MathAPI, MessageAPI, TwitterAPI, TicketAPI, TradingBot, TravelAPI,
  VehicleControlAPI). The reference calls are REALLY executed, one by one, on
  a fresh instance loaded with the task's initial state; each call is an
  assistant turn followed by a tool turn holding the real result, and a final
  assistant turn states the result. Calls run in order (`ordered` is True when
  there are several). Items whose execution errors or is not reproducible
  (e.g. a timestamp in the result) are dropped. The state is kept in the
  record (`env`), so `execute_calls` can replay any calls.

Only short items are kept: the tools JSON at most `max_tool_chars` characters
(600 by default; nearly every 'multiple' and 'parallel_multiple' item is
longer, so they yield little unless you raise it). The split is by BFCL item
id: a hash puts one item in EVAL_BUCKETS in eval.
"""

from __future__ import annotations

import ast
import copy
import functools
import hashlib
import importlib
import inspect
import json
import os
import random
import re
from collections.abc import Sequence

import bfcl_eval
from bfcl_eval.constants.executable_backend_config import (
    CLASS_FILE_PATH_MAPPING,
    MULTI_TURN_FUNC_DOC_FILE_MAPPING,
    STATELESS_CLASSES,
)

SPLITS = ("train", "eval")
EVAL_BUCKETS = 5
AST_CATEGORIES = {
    "simple": "BFCL_v4_simple_python",
    "parallel": "BFCL_v4_parallel",
    "multiple": "BFCL_v4_multiple",
    "parallel_multiple": "BFCL_v4_parallel_multiple",
}
EXECUTED_CATEGORIES = {"multi_turn_base": "BFCL_v4_multi_turn_base"}
CATEGORIES = tuple(AST_CATEGORIES) + tuple(EXECUTED_CATEGORIES)
DEFAULT_CATEGORIES = ("simple", "parallel", "multi_turn_base")
MAX_TOOL_CHARS = 600
MAX_QUESTION_CHARS = 400
# Tool results longer than this make the item too long for our models.
MAX_RESULT_CHARS = 300
# Back ends that need only what bfcl-eval itself imports (memory and web search
# need faiss, sentence-transformers, serpapi and the network).
EXECUTABLE_CLASSES = ("GorillaFileSystem", "MathAPI", "MessageAPI", "TwitterAPI", "TicketAPI",
                      "TradingBot", "TravelAPI", "VehicleControlAPI")
SYSTEM_PREFIX = ('Call tools as <tool_call>{"name": ..., "arguments": {...}}</tool_call>.'
                 " Tools: ")
_DATA_DIR = os.path.join(os.path.dirname(bfcl_eval.__file__), "data")


def _compact(value) -> str:
  return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _call_text(name: str, arguments: dict) -> str:
  return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def format_tool_calls(calls: Sequence[dict]) -> str:
  """Calls as `parse_tool_calls` reads them, one `<tool_call>` a line."""
  return "\n".join(_call_text(c["name"], c["arguments"]) for c in calls)


def _is_eval(item_id: str) -> bool:
  return hashlib.sha256(item_id.encode()).digest()[0] % EVAL_BUCKETS == 0


def _read_jsonl(path: str) -> list[dict]:
  items = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          items.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{line_number}: not JSON ({e}).") from None
  return items


def _load(stem: str) -> list[tuple[dict, dict]]:
  """(question item, possible answer) pairs of one BFCL file."""
  questions = _read_jsonl(os.path.join(_DATA_DIR, f"{stem}.json"))
  answers = {a["id"]: a for a in _read_jsonl(os.path.join(_DATA_DIR, "possible_answer", f"{stem}.json"))}
  missing = [q["id"] for q in questions if q["id"] not in answers]
  if missing:
    raise ValueError(f"{stem}: no possible answer for {missing[:5]}.")
  return [(q, answers[q["id"]]) for q in questions]


# --------------------------------------------------- single-turn (AST) ---


def _pick(value):
  """The reference value: the first accepted value, recursively into dicts."""
  if isinstance(value, dict):
    return {k: _pick(vs[0]) for k, vs in value.items() if vs and vs[0] != ""}
  if isinstance(value, list):
    return [_pick(v) for v in value]
  return value


def _ast_record(category: str, item: dict, answer: dict, max_tool_chars: int) -> dict | None:
  turns = item["question"]
  if len(turns) != 1 or len(turns[0]) != 1 or turns[0][0]["role"] != "user":
    return None
  question, tools = turns[0][0]["content"], item["function"]
  tools_json = _compact(tools)
  if len(tools_json) > max_tool_chars or len(question) > MAX_QUESTION_CHARS:
    return None
  accepted, calls = [], []
  for call in answer["ground_truth"]:
    (name, arguments), = call.items()
    accepted.append({"name": name, "arguments": arguments})
    calls.append({"name": name, "arguments": {k: _pick(vs[0]) for k, vs in arguments.items()
                                              if vs and vs[0] != ""}})
  return {
      "category": category,
      "tools": tools,
      "accepted_calls": accepted,
      "ordered": False,
      "messages": [
          {"role": "system", "content": SYSTEM_PREFIX + tools_json},
          {"role": "user", "content": question},
          {"role": "assistant", "content": format_tool_calls(calls)},
      ],
  }


# ---------------------------------------------------- executed traces ---


@functools.lru_cache(maxsize=None)
def _class_docs(class_name: str) -> dict[str, dict]:
  """Tool schemas of one back end, by name, without bfcl's boilerplate."""
  path = os.path.join(_DATA_DIR, "multi_turn_func_doc", MULTI_TURN_FUNC_DOC_FILE_MAPPING[class_name])
  docs = {}
  for doc in _read_jsonl(path):
    # "This tool belongs to the Math API, ... Tool description: Add two numbers."
    description = doc["description"].split("Tool description: ", 1)[-1].strip()
    docs[doc["name"]] = {"name": doc["name"], "description": description,
                         "parameters": doc["parameters"]}
  return docs


def _instances(env: dict) -> dict[str, object]:
  """Fresh back-end instances loaded with the task's initial state."""
  instances = {}
  for class_name in env["involved_classes"]:
    module = importlib.import_module(CLASS_FILE_PATH_MAPPING[class_name])
    instance = getattr(module, class_name)()
    if class_name not in STATELESS_CLASSES:
      instance._load_scenario(copy.deepcopy(env["initial_config"].get(class_name, {})),
                              long_context=False)
    instances[class_name] = instance
  return instances


def _method(instances: dict, name: str):
  for instance in instances.values():
    if not name.startswith("_") and callable(getattr(instance, name, None)):
      return getattr(instance, name)
  return None


def _parse_call(text: str, instances: dict) -> tuple[str, dict]:
  """"mv(source='a', destination='b')" -> ("mv", {"source": "a", ...})."""
  call = ast.parse(text, mode="eval").body
  if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
    raise ValueError(f"Not a plain function call: {text!r}.")
  method = _method(instances, call.func.id)
  if method is None:
    raise ValueError(f"No back end defines {call.func.id!r}.")
  args = [ast.literal_eval(a) for a in call.args]
  kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  # Positional arguments ("sort('a.pdf')") get their parameter names.
  bound = inspect.signature(method).bind(*args, **kwargs)
  return call.func.id, dict(bound.arguments)


def execute_calls(env: dict, calls: Sequence[dict]) -> list[str]:
  """Runs calls in order on fresh back ends; returns each result as JSON text.

  Args:
    env: a record's `env` ({"involved_classes", "initial_config"}).
    calls: [{"name": ..., "arguments": {...}}, ...].

  Returns:
    One compact JSON string per call; an exception becomes {"error": message}.
  """
  instances = _instances(env)
  results = []
  for call in calls:
    method = _method(instances, call["name"])
    try:
      if method is None:
        raise ValueError(f"unknown tool {call['name']!r}")
      result = method(**call["arguments"])
    except Exception as e:  # A tool error is a result the agent should see.
      result = {"error": f"{type(e).__name__}: {e}"}
    results.append(_compact(result) if not isinstance(result, str) else result)
  return results


def _describe(result: str) -> str:
  """States a tool result in a short clause; "" for a call that returns nothing."""
  try:
    value = json.loads(result)
  except json.JSONDecodeError:
    return result
  if value is None:
    return ""
  if isinstance(value, dict):
    return "; ".join(f"{k.replace('_', ' ')}: {v if isinstance(v, str) else _compact(v)}"
                     for k, v in value.items())
  return str(value)


def _final_answer(results: Sequence[str]) -> str:
  clauses = [c.rstrip(".") + "." for c in map(_describe, results) if c]
  return " ".join(["Done."] + clauses)


def _executed_record(category: str, item: dict, answer: dict, max_tool_chars: int) -> dict | None:
  if not set(item["involved_classes"]) <= set(EXECUTABLE_CLASSES):
    return None
  turn = item["question"][0]
  if len(turn) != 1 or turn[0]["role"] != "user" or len(turn[0]["content"]) > MAX_QUESTION_CHARS:
    return None
  env = {"involved_classes": list(item["involved_classes"]),
         "initial_config": item.get("initial_config", {})}
  instances = _instances(env)
  try:
    calls = [_parse_call(text, instances) for text in answer["ground_truth"][0]]
  except (ValueError, TypeError, SyntaxError):
    return None
  calls = [{"name": name, "arguments": arguments} for name, arguments in calls]
  results = execute_calls(env, calls)
  if results != execute_calls(env, calls):
    return None  # Not reproducible (a clock or a global random source).
  if any('"error"' in r or r.startswith("Error") for r in results):
    return None
  if sum(len(r) for r in results) > MAX_RESULT_CHARS:
    return None
  # The tools: those called, then others of the same back ends (in an order
  # fixed by the item id) while the JSON stays short.
  docs = {}
  for class_name in env["involved_classes"]:
    docs.update(_class_docs(class_name))
  called = list(dict.fromkeys(c["name"] for c in calls))
  if any(name not in docs for name in called):
    return None
  tools = [docs[name] for name in called]
  if len(_compact(tools)) > max_tool_chars:
    return None
  others = sorted(set(docs) - set(called))
  random.Random(item["id"]).shuffle(others)
  for name in others:
    if len(_compact(tools + [docs[name]])) <= max_tool_chars:
      tools.append(docs[name])
  tools.sort(key=lambda t: t["name"])
  messages = [
      {"role": "system", "content": SYSTEM_PREFIX + _compact(tools)},
      {"role": "user", "content": turn[0]["content"]},
  ]
  for call, result in zip(calls, results):
    messages.append({"role": "assistant", "content": _call_text(call["name"], call["arguments"])})
    messages.append({"role": "tool", "content": result})
  messages.append({"role": "assistant", "content": _final_answer(results)})
  return {
      "category": category,
      "tools": tools,
      "accepted_calls": [{"name": c["name"], "arguments": {k: [v] for k, v in c["arguments"].items()}}
                         for c in calls],
      "ordered": len(calls) > 1,
      "env": env,
      "messages": messages,
  }


# ---------------------------------------------------------------- records ---


@functools.lru_cache(maxsize=None)
def _category_records(category: str, max_tool_chars: int) -> tuple[dict, ...]:
  if category in AST_CATEGORIES:
    stem, build = AST_CATEGORIES[category], _ast_record
  elif category in EXECUTED_CATEGORIES:
    stem, build = EXECUTED_CATEGORIES[category], _executed_record
  else:
    raise ValueError(f"Unknown BFCL category {category!r}; expected one of {CATEGORIES}.")
  records = []
  for item, answer in _load(stem):
    record = build(category, item, answer, max_tool_chars)
    if record is not None:
      records.append({"id": f"agent/{category}/{item['id']}", "task": "agent",
                      "bfcl_id": item["id"], **record})
  return tuple(records)


def make_records(
    split: str = "train",
    size: int | None = None,
    seed: int = 0,
    *,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    max_tool_chars: int = MAX_TOOL_CHARS,
) -> list[dict]:
  """Tool-use records of one split, shuffled by `seed`.

  Args:
    split: 'train' or 'eval' (one BFCL item id in EVAL_BUCKETS).
    size: how many to return; None for all. More than the split holds is an
      error.
    seed: shuffle seed; the split itself does not depend on it.
    categories: any of CATEGORIES (see the module docstring).
    max_tool_chars: items whose compact tools JSON is longer are dropped.

  Returns:
    Records (see the module docstring).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  unknown = set(categories) - set(CATEGORIES)
  if unknown or not categories:
    raise ValueError(f"categories must be a non-empty subset of {CATEGORIES}, got {categories!r}.")
  records = [r for category in categories for r in _category_records(category, max_tool_chars)
             if _is_eval(r["bfcl_id"]) == (split == "eval")]
  if size is None:
    size = len(records)
  if not 0 <= size <= len(records):
    raise ValueError(f"The {split} split of {list(categories)} has {len(records)} items;"
                     f" asked for size={size}.")
  random.Random(seed).shuffle(records)
  # Deep copies: the cache must not see callers' edits.
  return copy.deepcopy(records[:size])


def check_disjoint(train: Sequence[dict], eval_: Sequence[dict]) -> None:
  """Raises ValueError if any eval BFCL item also appears in train."""
  train_ids = {r["bfcl_id"] for r in train}
  leaked = [r["id"] for r in eval_ if r["bfcl_id"] in train_ids]
  if leaked:
    raise ValueError(f"{len(leaked)} eval items appear in train, e.g. {leaked[:5]}.")


# ---------------------------------------------------------------- scoring ---

_TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def parse_tool_calls(completion: str) -> list[dict] | None:
  """Every `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, in order.

  Returns:
    [{"name": str, "arguments": dict}, ...], or None when there is no call or
    any call is not such a JSON object.
  """
  calls = []
  for body in _TOOL_CALL_RE.findall(completion):
    try:
      call = json.loads(body)
    except (json.JSONDecodeError, RecursionError):  # deeply nested junk is malformed too
      return None
    if (not isinstance(call, dict) or set(call) != {"name", "arguments"}
        or not isinstance(call["name"], str) or not isinstance(call["arguments"], dict)):
      return None
    calls.append(call)
  return calls or None


def _normalize_string(s: str) -> str:
  # As BFCL's checker: case, spaces and light punctuation do not matter.
  return re.sub(r"[ ,./\-_*^'\"]", "", s.lower())


def _value_matches(value, accepted) -> bool:
  """One predicted value against one accepted value (BFCL's equivalences)."""
  if isinstance(accepted, bool) or isinstance(value, bool):
    return type(value) is type(accepted) and value == accepted
  if isinstance(accepted, (int, float)):
    return isinstance(value, (int, float)) and float(value) == float(accepted)
  if isinstance(accepted, str):
    return isinstance(value, str) and _normalize_string(value) == _normalize_string(accepted)
  if isinstance(accepted, (list, tuple)):
    return (isinstance(value, (list, tuple)) and len(value) == len(accepted)
            and all(_value_matches(v, a) for v, a in zip(value, accepted)))
  if isinstance(accepted, dict):
    # A nested dict in the possible answers maps each key to accepted values.
    return isinstance(value, dict) and _arguments_match(value, accepted)
  return value == accepted


def _arguments_match(arguments: dict, accepted: dict) -> bool:
  if set(arguments) - set(accepted):
    return False
  for key, values in accepted.items():
    if key not in arguments:
      if "" not in values:
        return False  # Required: "" marks an argument that may be omitted.
    elif not any(_value_matches(arguments[key], a) for a in values):
      return False
  return True


def _call_matches(call: dict, accepted: dict) -> bool:
  return call["name"] == accepted["name"] and _arguments_match(call["arguments"], accepted["arguments"])


def _match_unordered(calls: list[dict], accepted: list[dict]) -> bool:
  if not calls:
    return True
  return any(_call_matches(calls[0], a) and _match_unordered(calls[1:], accepted[:i] + accepted[i + 1:])
             for i, a in enumerate(accepted))


def score_calls(record: dict, completion: str) -> float:
  """1.0 if the completion's tool calls are an accepted answer, else 0.0.

  Every call must name the right function with each argument among its
  accepted values and no unknown argument; the calls are matched one to one,
  in any order unless `record["ordered"]` (executed multi-step traces, where
  the completion holds all the calls, e.g. the assistant turns joined).
  Malformed or missing calls score 0.0.
  """
  calls = parse_tool_calls(completion)
  accepted = record["accepted_calls"]
  if calls is None or len(calls) != len(accepted):
    return 0.0
  if record["ordered"]:
    return float(all(_call_matches(c, a) for c, a in zip(calls, accepted)))
  return float(_match_unordered(calls, list(accepted)))
