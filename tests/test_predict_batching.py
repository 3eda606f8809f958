"""How predict and evaluate group whole patients into scoring batches."""

from __future__ import annotations

import itertools

from brainmets.predict import batch_by_slices


def test_batches_keep_patients_whole_within_the_budget():
    sizes = {"a": 3, "b": 4, "c": 2, "d": 9, "e": 1}
    batches = list(batch_by_slices(sizes, 7, size=sizes.__getitem__))
    # d (9 slices) is larger than the budget: a batch of its own, never split.
    assert batches == [["a", "b"], ["c"], ["d"], ["e"]]
    assert list(batch_by_slices([], 7, size=len)) == []


def test_batches_are_formed_as_patients_arrive():
    """predict feeds patients as its workers finish them: the first batch must come out
    without waiting for the stream to end (here it never ends)."""
    endless = (f"p{i}" for i in itertools.count())
    first, second = itertools.islice(batch_by_slices(endless, 10, size=lambda _: 4), 2)
    assert first == ["p0", "p1"] and second == ["p2", "p3"]
