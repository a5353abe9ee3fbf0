"""The agent's report numbers: increasing within a process, and above whatever porter applied."""

from __future__ import annotations

import time

from cloudhpc.submitter.agent import _Sequence


def test_numbers_increase_even_when_the_clock_stands_still_or_goes_back() -> None:
    seq = _Sequence()
    numbers = [seq.next() for _ in range(1000)]
    assert numbers == sorted(set(numbers))
    assert numbers[0] >= time.time_ns() - 10**9


def test_a_floor_ahead_of_the_clock_lifts_every_later_number_above_it() -> None:
    seq = _Sequence()
    before = seq.next()
    floor = time.time_ns() + 86_400 * 10**9  # what a previous agent, one day ahead, numbered
    seq.advance_past(floor)
    after = [seq.next() for _ in range(3)]
    assert after == [floor + 1, floor + 2, floor + 3]
    assert before < floor


def test_a_floor_behind_changes_nothing() -> None:
    seq = _Sequence()
    first = seq.next()
    seq.advance_past(5)
    assert seq.next() > first
