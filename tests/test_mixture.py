"""Data mixtures: realised weights, curriculum phases, exact resume, shards, errors."""

import json

import numpy as np
import pytest

from data.chat import render_chat
from data.mixture import make_mixture_iterator
from data.tokenizer import train_tokenizer

SEQ_LEN, BATCH = 64, 4


def _record(pool, i, level=None):
  record = {"id": f"{pool}/{i}", "messages": [
      {"role": "user", "content": f"{pool} q{i}: " + "ab " * (i % 5)},
      {"role": "assistant", "content": f"ans {i}"},
  ]}
  if level is not None:
    record["level"] = level
  return record


POOLS = {
    "math": [_record("math", i, level=i % 3) for i in range(90)],
    "code": [_record("code", i, level=i % 2) for i in range(40)],
    "chat": [_record("chat", i) for i in range(30)],  # no level: level 0
    "hard": [_record("hard", i, level=2) for i in range(20)],  # nothing easy
}
ALL = [r for records in POOLS.values() for r in records]
CURRICULUM = ((0.0, 0), (0.3, 1), (0.6, 2))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = [m["content"] for r in ALL for m in r["messages"]]
  return train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def rendered(tokenizer):
  """Maps each document's ids to its record."""
  out = {}
  for r in ALL:
    ids, _ = render_chat(r["messages"], tokenizer)
    assert len(ids) <= SEQ_LEN, "test records must fit a row whole"
    out[tuple(ids)] = r
  return out


def _iterator(tokenizer, weights=None, **kwargs):
  kwargs = {"seed": 0, "total_steps": 10, **kwargs}
  weights = weights or {"math": 5, "code": 3, "chat": 2, "hard": 0}
  return make_mixture_iterator(POOLS, weights, tokenizer, seq_len=SEQ_LEN,
                               batch_size=BATCH, **kwargs)


def _records(batch, rendered):
  """The records packed into a batch, row by row."""
  out = []
  for row in range(BATCH):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      where = seg == s
      ids = tuple(np.concatenate([batch["inputs"][row][where][:1], batch["targets"][row][where]]))
      assert ids in rendered, "packed document is not a whole record"
      out.append(rendered[ids])
  return out


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_format_matches_the_pipeline(tokenizer, rendered):
  batch = next(_iterator(tokenizer))
  dtypes = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32}
  assert set(batch) == set(dtypes)
  for key, dtype in dtypes.items():
    assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key
  assert _records(batch, rendered)
  assert tokenizer.end_id in batch["targets"][batch["loss_mask"] == 1]


def test_realised_mix_matches_weights(tokenizer, rendered):
  it = _iterator(tokenizer)
  counts = {"math": 0, "code": 0, "chat": 0, "hard": 0}
  while it.mixture_stats()["records"] < 2000:
    for record in _records(next(it), rendered):
      counts[record["id"].split("/")[0]] += 1
  stats = it.mixture_stats()
  # The packer holds one drawn record back for the next batch.
  assert sum(counts.values()) == stats["records"] - 1
  assert counts["hard"] == 0 and "hard" not in stats["fraction"]  # weight 0: skipped
  for pool, weight in {"math": 0.5, "code": 0.3, "chat": 0.2}.items():
    assert abs(stats["fraction"][pool] - weight) < 0.03, (pool, stats["fraction"])
    assert abs(counts[pool] / sum(counts.values()) - weight) < 0.03, (pool, counts)
  # Without a curriculum every level is drawn, uniformly over a pool's records.
  math_levels = stats["levels"]["math"]
  assert set(math_levels) == {0, 1, 2} and min(math_levels.values()) > 0.25 * counts["math"]


def test_curriculum_allows_only_its_levels(tokenizer, rendered):
  total = 30
  it = _iterator(tokenizer, total_steps=total, curriculum=CURRICULUM)
  seen = {0: set(), 1: set(), 2: set()}
  for k in range(40):
    allowed = 0 if k < 9 else 1 if k < 18 else 2  # p = k / 30 against 0.3, 0.6
    assert it.max_level() == allowed
    for record in _records(next(it), rendered):
      assert record.get("level", 0) <= allowed, (k, record["id"])
      seen[allowed].add(record.get("level", 0))
  assert seen == {0: {0}, 1: {0, 1}, 2: {0, 1, 2}}
  assert it.mixture_stats()["max_level"] == 2


def test_pool_without_allowed_levels_gives_its_lowest(tokenizer, rendered):
  it = _iterator(tokenizer, weights={"math": 1, "code": 0, "chat": 0, "hard": 1},
                 curriculum=CURRICULUM)
  levels = {(r["id"].split("/")[0], r["level"])
            for _ in range(2) for r in _records(next(it), rendered)}
  assert levels == {("math", 0), ("hard", 2)}


def test_resume_is_exact_across_phase_boundaries(tokenizer):
  steps = 12
  it = _iterator(tokenizer, curriculum=CURRICULUM)  # phases change after batches 3 and 6
  states, batches = [], []
  for _ in range(steps):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  assert [len(s["phases"]) for s in states[2:8]] == [1, 2, 2, 2, 3, 3]
  for start in (2, 3, 4, 5, 6, 7):
    fresh = _iterator(tokenizer, curriculum=CURRICULUM)
    fresh.set_state(states[start])
    assert fresh.get_state() == states[start]
    _assert_same(batches[start:], [next(fresh) for _ in range(steps - start)])
  assert fresh.mixture_stats() == it.mixture_stats()


def test_deterministic_for_a_seed(tokenizer):
  a, b, c = (_iterator(tokenizer, seed=s, curriculum=CURRICULUM) for s in (0, 0, 1))
  first = [next(a) for _ in range(5)]
  _assert_same(first, [next(b) for _ in range(5)])
  assert not np.array_equal(first[0]["inputs"], next(c)["inputs"])


def test_shards_are_disjoint(tokenizer, rendered):
  owners = []
  for index in range(2):
    it = _iterator(tokenizer, shard_index=index, shard_count=2, curriculum=CURRICULUM)
    owners.append({r["id"] for _ in range(12) for r in _records(next(it), rendered)})
  assert owners[0] and owners[1] and not owners[0] & owners[1]


@pytest.mark.parametrize("weights, match", [
    ({"math": 1, "code": 1, "chat": 1, "hard": 1, "poetry": 1}, r"do not exist: \['poetry'\]"),
    ({"math": 1, "code": 1}, r"pools \['chat', 'hard'\] have no weight"),
    ({"math": -1, "code": 1, "chat": 1, "hard": 1}, r"weights\['math'\]=-1"),
    ({"math": float("nan"), "code": 1, "chat": 1, "hard": 1}, r"weights\['math'\]=nan"),
    ({"math": 0, "code": 0, "chat": 0, "hard": 0}, "all zero"),
])
def test_bad_weights_are_errors(tokenizer, weights, match):
  with pytest.raises(ValueError, match=match):
    _iterator(tokenizer, weights=weights)


@pytest.mark.parametrize("curriculum, match", [
    (((0.0, 0), (0.6, 1), (0.3, 2)), "increase strictly"),
    (((0.0, 0), (0.0, 1)), "increase strictly"),
    (((0.2, 0), (0.5, 1)), "start at fraction 0.0"),
    (((0.0, 1), (0.5, 0)), "must not decrease"),
    (((0.0, 0), (1.5, 1)), r"curriculum\[1\] fraction 1.5"),
    (((0.0, -1),), r"curriculum\[0\] max_level -1"),
    (((0.0,),), r"curriculum\[0\]=\(0.0,\) must be a \(fraction, max_level\) pair"),
])
def test_bad_curriculum_is_an_error(tokenizer, curriculum, match):
  with pytest.raises(ValueError, match=match):
    _iterator(tokenizer, curriculum=curriculum)


def test_bad_arguments_are_errors(tokenizer):
  with pytest.raises(ValueError, match="total_steps=0"):
    _iterator(tokenizer, total_steps=0)
  with pytest.raises(ValueError, match="shard_index=2"):
    _iterator(tokenizer, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match=r"pools\['hard'\] has 20 records, too few for 32 shards"):
    _iterator(tokenizer, weights={"math": 1, "code": 0, "chat": 0, "hard": 1},
              shard_index=31, shard_count=32)
  bad = {"math": [{**POOLS["math"][0], "level": "easy"}]}
  with pytest.raises(ValueError, match=r"pools\['math'\] record 'math/0': level must be an int"):
    make_mixture_iterator(bad, {"math": 1}, tokenizer, seq_len=SEQ_LEN, batch_size=BATCH,
                          seed=0, total_steps=10)
  other = make_mixture_iterator({"math": POOLS["math"]}, {"math": 1}, tokenizer,
                                seq_len=SEQ_LEN, batch_size=BATCH, seed=0, total_steps=10)
  with pytest.raises(ValueError, match="resume with the same data"):
    other.set_state(_iterator(tokenizer).get_state())
  with pytest.raises(ValueError, match="Not a mixture iterator state"):
    other.set_state({"parent": 0})
