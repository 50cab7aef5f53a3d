"""bench/bench_recipes.py end to end at toy size: it trains each recipe, scores every (checkpoint, sampling steps)
pair against the floor, and writes the table, the json and the plot."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_recipes  # noqa: E402

TOY = ["--checkpoints", "2", "4", "--seeds", "0", "--num-images", "16", "--sampling-steps", "2", "3",
       "--set", "model.base_channels=8", "model.channel_mult=[1,2]", "model.norm_groups=4", "train.batch_size=8",
       "train.warmup_steps=1", "train.log_every=1"]


def test_recipe_table_at_toy_size(tmp_path, capsys):
    assert bench_recipes.main(["--recipes", "flow", "edm", *TOY, "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "recipes.json").read_text())
    assert 0 < saved["floor"] < 50
    cells = {(r["recipe"], r["step"], r["sampling_steps"]) for r in saved["table"]}
    assert cells == {(r, s, n) for r in ("flow", "edm") for s in (2, 4) for n in (2, 3)}
    samplers = {r["recipe"]: r["sampler"] for r in saved["rows"]}
    assert samplers == {"flow": "flow_dpmpp", "edm": "edm_dpmpp"}        # each objective's own (auto)
    for row in saved["table"]:
        assert row["fid"] > 0 and row["vs_floor"] == pytest.approx(row["fid"] / saved["floor"])
        assert row["train_s"] > 0 and row["sample_s"] > 0
    by_step = {r["step"]: r["train_s"] for r in saved["table"] if r["recipe"] == "flow"}
    assert by_step[4] == pytest.approx(2 * by_step[2])                  # one step rate per run
    assert (tmp_path / "recipes.png").stat().st_size > 10_000
    assert "| flow | 4 | flow_dpmpp | 3 | 1 |" in (tmp_path / "recipes.md").read_text()


def test_merge_joins_an_earlier_run_and_refuses_another_sample_size(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert bench_recipes.main(["--recipes", "flow", *TOY, "--out", str(first)]) == 0
    assert bench_recipes.main(["--recipes", "edm", *TOY, "--merge", str(first / "recipes.json"),
                               "--out", str(second)]) == 0
    saved = json.loads((second / "recipes.json").read_text())
    assert {r["recipe"] for r in saved["rows"]} == {"flow", "edm"}
    earlier = json.loads((first / "recipes.json").read_text())["rows"]
    assert [r for r in saved["rows"] if r["recipe"] == "flow"] == earlier          # carried over unchanged
    assert "| flow | 4 | flow_dpmpp | 3 | 1 |" in (second / "recipes.md").read_text()
    with pytest.raises(SystemExit, match="--num-images"):
        bench_recipes.main(["--recipes", "edm", *[a if a != "16" else "8" for a in TOY],
                            "--merge", str(first / "recipes.json")])
