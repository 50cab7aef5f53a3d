"""A busy machine, told in one line: training that shares a small CPU with another job runs 10-100x slower than
alone (each process's threads wait on the other's), and nothing else says why.

Two cheap checks. At the start, the 1-minute load average against the cores; where it is high, a 0.2 s sample of
``/proc/stat`` confirms that other work is running now (the load average also remembers a job that just ended).
During the run, ``Pace``: each log window's images per second against the best window so far. Both say what to
do: wait, stop the other job, or give this run fewer threads (``train.num_threads``).
"""

from __future__ import annotations

import os
import time

import torch

SLOWDOWN = 3.0          # a log window this many times slower than the best one so far is not noise
SAMPLE_SECONDS = 0.2    # how long the start check watches /proc/stat once the load average looks high


def set_threads(n: int) -> int:
    """``torch.set_num_threads(n)`` for n > 0 (``train.num_threads``); 0 keeps torch's default, a thread per
    core. Returns the threads this process now uses."""
    if n < 0:
        raise ValueError(f"train.num_threads must be 0 (torch's default: one per core) or positive (got {n})")
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)                 # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other work keeps busy right now (this process sleeps meanwhile), or None where unknown."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(seconds)
    after = _cpu_times()
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total > 0 else None


def busy_at_start(threads: int, load: float | None = None, cores: int | None = None, now=None) -> str | None:
    """A warning line where other work already uses the CPU this run's ``threads`` will want, else None. ``load``
    (default: the 1-minute load average), ``cores`` and ``now`` (``busy_cores``) are there for tests."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):                # not on this platform (Windows)
            return None
    if load + threads <= cores + 0.5:
        return None
    running = (now or busy_cores)()
    if running is not None and running + threads <= cores + 0.5:
        return None                                      # the load average remembers work that has ended
    if running is None and load < cores:                 # no /proc/stat (macOS idles above 1): the load alone,
        return None                                      # only where it fills every core
    seen = f"{running:.1f} cores busy now" if running is not None else f"load average {load:.1f}"
    return (f"WARNING: other work is using this CPU ({seen}, {cores} cores, this run wants {threads} threads): "
            f"training will crawl while it runs; wait for it, or set train.num_threads="
            f"{max(1, cores - round(running if running is not None else load))} to share the cores")


class Pace:
    """Watches the training speed of each log window (images per second) and returns a warning, once, when a
    window runs ``SLOWDOWN`` times slower than the best one so far: another job started on this machine, or the
    machine throttles. The first window (compilation, warm-up) sets no standard."""

    def __init__(self, threads: int, cpu: bool):
        self.threads, self.cpu = threads, cpu
        self.windows, self.best, self.warned = 0, 0.0, False

    def check(self, rate: float, step: int) -> str | None:
        self.windows += 1
        if self.windows == 1:
            return None
        if self.best and rate * SLOWDOWN < self.best and not self.warned:
            self.warned = True
            advice = (f"stop the other job, or set train.num_threads=1 (this run uses {self.threads}) to share the "
                      f"cores" if self.cpu else "check what else runs on this device")
            return (f"WARNING: training slowed to {rate:.0f} img/s at step {step}, from {self.best:.0f} img/s "
                    f"earlier: other work is probably using the machine; {advice}")
        self.best = max(self.best, rate)
        return None
