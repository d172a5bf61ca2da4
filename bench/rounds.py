"""Interleaved rounds and their per-round ratios: the benchmark's way of timing variants on a machine shared with other
jobs. Every entry runs once per round, in an order rotated from round to round, so that a disturbance hits all
entries alike; a variant's number is the median over rounds of its time divided by the reference's in the same round,
with the interquartile range of those ratios."""

import statistics


def interleaved_rounds(entries: list, run, rounds: int, warmup=None) -> tuple:
    """Time every entry `rounds` times, interleaved.

    Args:
        entries (`list`): What to time (hashable).
        run (`callable`): `run(entry)` returns (wall seconds, process CPU seconds) of one timing.
        rounds (`int`): Rounds; round i starts at entry i (modulo the number of entries).
        warmup (`callable`, *optional*): Runs each entry once before the rounds; defaults to `run`.

    Returns:
        `tuple`: Two dicts {entry: [seconds, one per round]}, wall and CPU.
    """
    for e in entries:
        (warmup or run)(e)
    wall, cpu = {e: [] for e in entries}, {e: [] for e in entries}
    for i in range(rounds):
        k = i % len(entries)
        for e in entries[k:] + entries[:k]:
            w, c = run(e)
            wall[e].append(w)
            cpu[e].append(c)
    return wall, cpu


def quantiles(values) -> tuple:
    """(first quartile, median, third quartile) of `values`."""
    values = sorted(values)
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ratio_stats(times: dict, entry, ref) -> tuple:
    """Quartiles of the per-round ratios of `entry`'s times to `ref`'s."""
    return quantiles([a / b for a, b in zip(times[entry], times[ref])])
