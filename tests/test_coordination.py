"""Agreement keys (coordination.next_key): the same on every process for the
same operations in the same order, whatever else each process did."""

from __future__ import annotations

from fastpersist_jax import coordination


def test_keys_name_the_checkpoint_and_count_operations_on_it(monkeypatch):
  monkeypatch.setattr(coordination, "_SEQUENCES", type(coordination._SEQUENCES)())  # pylint: disable=protected-access
  key = coordination.next_key
  # Orbax's temporary directory and each process's own root do not matter.
  assert coordination.checkpoint_name("/a/host0/12.orbax-checkpoint-tmp/default") == "12/default"
  assert coordination.checkpoint_name("/b/host1/12/default/") == "12/default"
  first = key("restore", [0, 1], "/a/host0/12/default")
  assert first.endswith("/12/default/0")
  assert key("restore", [0, 1], "/b/host1/12/default") == first[:-1] + "1"
  # Another checkpoint, operation or group counts on its own: a call one
  # process skipped shifts no other checkpoint's keys.
  assert key("restore", [0, 1], "/a/13/default").endswith("/13/default/0")
  assert key("save", [0, 1], "/a/12/default").endswith("/12/default/0")
  assert key("restore", [0], "/a/12/default").split("/")[2] != first.split("/")[2]


def test_counts_are_forgotten_oldest_first_past_the_bound(monkeypatch):
  monkeypatch.setattr(coordination, "_SEQUENCES", type(coordination._SEQUENCES)())  # pylint: disable=protected-access
  monkeypatch.setattr(coordination, "_SEQUENCES_MAX", 3)
  for step in range(5):
    coordination.next_key("save", [0, 1], f"/r/{step}/default")
  assert len(coordination._SEQUENCES) == 3   # pylint: disable=protected-access
  assert coordination.next_key("save", [0, 1], "/r/4/default").endswith("/4/default/1")
  assert coordination.next_key("save", [0, 1], "/r/0/default").endswith("/0/default/0")
