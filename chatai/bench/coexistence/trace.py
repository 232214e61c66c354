"""A seeded synthetic workload of regular jobs: arrivals, node counts, time limits, run times.

Why synthetic and seeded: the two runs of the experiment must see the very same jobs at the
very same (relative) times, and a reader must be able to get the same trace again. The shape
follows what clusters show: a day with a busier middle (arrival rate a raised sine), mostly
small jobs with some wide ones (1-4 nodes), and users who ask for more time than they use
(each job runs 30-95 % of its limit). Time is compressed: a "day" lasts ``day_s`` seconds.
Slurm counts time limits in whole minutes, so limits are drawn in minutes and run times
in seconds below them.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

NODE_WEIGHTS = {1: 0.45, 2: 0.3, 3: 0.1, 4: 0.15}


@dataclass(frozen=True)
class TraceJob:
    index: int
    arrival_s: float  # seconds after the run's start
    nodes: int
    limit_min: int  # the --time asked for
    run_s: float  # what it really runs (sleep), always below the limit

    @property
    def name(self) -> str:
        return f"regular-{self.index:03d}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TraceSpec:
    """What a trace looks like; ``load`` is the offered GPU load as a share of all GPUs."""

    seed: int = 11
    day_s: float = 240.0  # arrivals happen within [0, day_s)
    cluster_nodes: int = 8
    load: float = 0.6
    limits_min: tuple[int, ...] = (1, 2, 3)
    run_fraction: tuple[float, float] = (0.3, 0.95)


def mean_gpu_seconds(spec: TraceSpec) -> float:
    """Expected node-seconds one job uses: E[nodes] x E[limit] x E[run fraction]."""
    nodes = sum(n * w for n, w in NODE_WEIGHTS.items()) / sum(NODE_WEIGHTS.values())
    limit = 60.0 * sum(spec.limits_min) / len(spec.limits_min)
    frac = sum(spec.run_fraction) / 2
    return nodes * limit * frac


def daily_rate(t: float, day_s: float) -> float:
    """Relative arrival rate over the day (mean 1): quiet at the ends, busy in the middle."""
    return 1.0 - 0.6 * math.cos(2 * math.pi * t / day_s)


def generate(spec: TraceSpec) -> list[TraceJob]:
    """The jobs of one day: a non-homogeneous Poisson process (thinning), seeded."""
    if spec.day_s <= 0 or not 0 < spec.load <= 1 or not spec.limits_min or min(spec.limits_min) < 1:
        raise ValueError("need day_s > 0, 0 < load <= 1 and limits of at least one minute")
    lo, hi = spec.run_fraction
    if not 0 < lo <= hi < 1:
        raise ValueError("run fractions must lie in (0, 1): a job ends before its limit")
    rng = random.Random(spec.seed)
    mean_rate = spec.load * spec.cluster_nodes / mean_gpu_seconds(spec)  # jobs per second
    peak = mean_rate * 1.6
    sizes, weights = zip(*NODE_WEIGHTS.items())
    jobs: list[TraceJob] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= spec.day_s:
            break
        if rng.random() * 1.6 > daily_rate(t, spec.day_s):
            continue
        nodes = min(rng.choices(sizes, weights)[0], spec.cluster_nodes)
        limit = rng.choice(spec.limits_min)
        run = round(60.0 * limit * rng.uniform(lo, hi), 1)
        jobs.append(TraceJob(len(jobs), round(t, 2), nodes, limit, run))
    return jobs
