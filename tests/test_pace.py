"""A busy machine is said in one line (issue 30): at the start, by the load against the cores, confirmed by what
runs now; during the run, by a log window far slower than the best one; and ``train.num_threads`` is the setting
that the lines point to."""

import pytest
import torch

from diffunet.training import pace
from diffunet.config import ConfigError


def test_a_busy_cpu_at_the_start_is_one_line_with_the_setting_to_change():
    line = pace.busy_at_start(threads=2, load=2.1, cores=2, now=lambda: 1.9)
    assert line == ("WARNING: other work is using this CPU (1.9 cores busy now, 2 cores, this run wants 2 threads): "
                    "training will crawl while it runs; wait for it, or set train.num_threads=1 to share the cores")
    assert pace.busy_at_start(threads=2, load=0.2, cores=2, now=lambda: 1 / 0) is None    # idle: nothing sampled
    # a high load average left by a job that has just ended: what runs now decides
    assert pace.busy_at_start(threads=2, load=1.8, cores=2, now=lambda: 0.1) is None
    assert pace.busy_at_start(threads=1, load=1.0, cores=2, now=lambda: 1.0) is None      # room for one thread
    assert "load average 3.0" in pace.busy_at_start(threads=2, load=3.0, cores=2, now=lambda: None)
    assert pace.busy_at_start(threads=2, load=1.5, cores=2, now=lambda: None) is None   # no /proc/stat: load alone


def test_busy_cores_reads_the_machine():
    import os

    busy = pace.busy_cores(0.05)
    assert busy is not None and 0 <= busy <= os.cpu_count()             # Linux: /proc/stat is there


def test_pace_warns_once_when_a_window_falls_far_below_the_best():
    watch = pace.Pace(threads=2, cpu=True)
    assert watch.check(5.0, 25) is None                                 # warm-up: sets no standard
    assert [watch.check(rate, step) for rate, step in ((200, 50), (150, 75), (80, 100))] == [None] * 3
    line = watch.check(40, 125)                                         # 5x slower than the best window
    assert line == ("WARNING: training slowed to 40 img/s at step 125, from 200 img/s earlier: other work is "
                    "probably using the machine; stop the other job, or set train.num_threads=1 (this run uses 2) "
                    "to share the cores")
    assert watch.check(10, 150) is None                                 # once
    gpu = pace.Pace(threads=8, cpu=False)
    for rate in (1, 100):
        gpu.check(rate, 1)
    assert "check what else runs on this device" in gpu.check(20, 3)


def test_num_threads_is_a_setting_of_the_run(tmp_path):
    from test_training import fast_cfg
    from diffunet.training.loop import Trainer

    before = torch.get_num_threads()
    try:
        assert pace.set_threads(0) == before                            # 0: torch's default stays
        Trainer(fast_cfg(tmp_path, "train.num_threads=1"))
        assert torch.get_num_threads() == 1
        with pytest.raises(ConfigError, match=r"train.num_threads must be 0 .* or positive \(got -1\)"):
            Trainer(fast_cfg(tmp_path, "train.num_threads=-1"))
    finally:
        torch.set_num_threads(before)


def test_the_trainer_says_a_busy_cpu_at_the_start(tmp_path, monkeypatch, capsys):
    import os

    from test_training import fast_cfg
    from diffunet.training.loop import Trainer

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 2.0, 1.0))
    monkeypatch.setattr(pace, "busy_cores", lambda seconds=0.2: 1.8)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    try:
        Trainer(fast_cfg(tmp_path, "train.num_threads=2"))
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "WARNING: other work is using this CPU (1.8 cores busy now, 2 cores, this run wants 2 threads)" in out
