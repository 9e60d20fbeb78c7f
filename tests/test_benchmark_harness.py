"""The benchmark harness's bookkeeping, on a scripted clock (no timing is asserted).

The functions under test take a ``clock``; here it returns scripted instants, so each
"call" lasts exactly what the test says and the arithmetic can be checked by hand.
"""

import itertools

import pytest

from benchmarks import harness


class ScriptedClock:
    """``clock()`` for the harness: every call made while ``durations`` is consumed
    advances time by the next duration once the call it brackets finishes."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def task(self, name, seconds):
        def run():
            self.log.append(name)
            self.now += next(seconds) if hasattr(seconds, "__next__") else seconds
        return run


def test_alternate_interleaves_rounds_after_warming_each_up():
    clock = ScriptedClock()
    a = clock.task("a", iter([9.0, 1.0, 2.0, 3.0]))  # the first call is the warm-up
    b = clock.task("b", iter([9.0, 2.0, 2.0, 9.0]))
    times = harness.alternate([a, b], reps=3, clock=clock)
    assert clock.log == ["a", "b"] + ["a", "b"] * 3
    assert times == [[1.0, 2.0, 3.0], [2.0, 2.0, 9.0]]
    ratio = harness.ratio_per_round(times[0], times[1])  # b / a per round: 2, 1, 3
    assert ratio == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert harness.ratio_text(ratio) == "2.00x (1.00-3.00)"


def test_bracketed_divides_each_repetition_by_the_larger_neighbouring_peak():
    clock = ScriptedClock()
    # Peak call: 100 FLOPs; reading = 100 / best of 2 calls.
    peak_seconds = iter([1.0] + [1.0, 2.0] + [0.5, 0.5] + [1.0, 1.0] + [2.0, 2.0])  # warm-up, then 4 readings
    step_seconds = iter([7.0, 10.0, 5.0, 20.0])  # warm-up, then 3 repetitions
    row = harness.bracketed(clock.task("step", step_seconds), 1000.0, clock.task("peak", peak_seconds), 100.0,
                            reps=3, peak_calls=2, tolerance=0.9, clock=clock)
    assert clock.log[:2] == ["step", "peak"]
    assert clock.log[2:] == ["peak"] * 2 + list(itertools.chain(*[["step", "peak", "peak"]] * 3))
    peaks = [100.0, 200.0, 100.0, 50.0]
    # repetition i: 1000 / t_i / max(p_i, p_{i+1})
    fractions = [1000 / 10.0 / 200.0, 1000 / 5.0 / 200.0, 1000 / 20.0 / 100.0]
    assert row["fraction_of_peak"]["median"] == pytest.approx(sorted(fractions)[1])
    assert row["fraction_of_peak"]["min"] == pytest.approx(min(fractions))
    assert row["step_s"] == {"median": 10.0, "min": 5.0, "max": 20.0, "n": 3}
    assert (row["peak_before"], row["peak_after"]) == (peaks[0], peaks[-1])
    assert row["peak_spread"] == pytest.approx((200.0 - 50.0) / 200.0)
    assert row["reliable"]


def test_a_row_whose_peak_drifts_beyond_the_tolerance_is_unreliable():
    steady = harness.bracket_readings([1.0, 1.0], [100.0, 95.0, 100.0], flops=50.0, tolerance=0.1)
    drifting = harness.bracket_readings([1.0, 1.0], [100.0, 70.0, 100.0], flops=50.0, tolerance=0.1)
    assert steady["reliable"] and steady["peak_spread"] == pytest.approx(0.05)
    assert not drifting["reliable"] and drifting["peak_spread"] == pytest.approx(0.3)
    # The fraction never flatters: each repetition divides by the faster neighbouring reading.
    assert drifting["fraction_of_peak"]["max"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one more peak reading"):
        harness.bracket_readings([1.0, 1.0], [100.0, 100.0], flops=1.0)


def test_the_report_names_the_cpu_and_the_cores():
    assert harness.cpu_model()
    th = harness.threads()
    assert 1 <= th["usable_cores"] <= th["machine_cores"]
