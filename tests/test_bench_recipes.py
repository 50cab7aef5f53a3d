"""bench/bench_recipes.py end to end at toy size: it trains each recipe, scores every (checkpoint, sampling steps)
pair against the floor, and writes the table, the json and the plot."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_recipes  # noqa: E402

from diffunet.config import load_config  # noqa: E402

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
    with pytest.raises(SystemExit, match=r"trained with --set model.base_channels=8 .*, this run with "
                                         r"model.base_channels=8 .* train.lr=5e-3; run with the --set"):
        bench_recipes.main(["--recipes", "edm", *TOY, "train.lr=5e-3", "--merge", str(first / "recipes.json")])


def test_each_recipe_trains_on_the_table_settings_whatever_the_preset(tmp_path, monkeypatch):
    class Trained(Exception):
        pass

    def train(cfg):
        raise Trained(cfg)
    monkeypatch.setattr(bench_recipes, "train", train)
    with pytest.raises(Trained) as e:
        bench_recipes.main(["--recipes", "flow", *TOY, "--work", str(tmp_path)])
    cfg = e.value.args[0]
    table = load_config("digits", bench_recipes.TABLE)                 # the preset with the table's settings on it
    keys = [item.split("=")[0] for item in bench_recipes.TABLE]
    preset = load_config("digits")
    assert any(OmegaConf.select(preset, k) != OmegaConf.select(table, k) for k in keys)   # else nothing to win over
    assert {k: OmegaConf.select(cfg, k) for k in keys} == {k: OmegaConf.select(table, k) for k in keys}
    assert cfg.diffusion.objective == "flow" and cfg.model.base_channels == 8        # the recipe, then --set


def test_rescore_scores_the_runs_in_work_without_training_them_again(tmp_path, monkeypatch):
    work, first, again = tmp_path / "work", tmp_path / "first", tmp_path / "again"
    assert bench_recipes.main(["--recipes", "flow", *TOY, "--work", str(work), "--out", str(first)]) == 0
    monkeypatch.setattr(bench_recipes, "train", lambda cfg: pytest.fail("--rescore trained a run"))
    assert bench_recipes.main(["--recipes", "flow", *TOY, "--work", str(work), "--rescore", "--out", str(again)]) == 0
    before, after = (json.loads((d / "recipes.json").read_text())["rows"] for d in (first, again))
    assert [r["fid"] for r in after] == pytest.approx([r["fid"] for r in before])      # same weights, same draws
    assert [r["train_s"] for r in after] == pytest.approx([r["train_s"] for r in before])  # from the run's logs
    with pytest.raises(SystemExit, match=r"other train.lr \([0-9.e-]+, asked 0.005\); pass the --set"):
        bench_recipes.main(["--recipes", "flow", *TOY, "train.lr=5e-3", "--work", str(work), "--rescore"])
    with pytest.raises(SystemExit, match=r"flow-1/checkpoints/step_0*4 is missing"):
        bench_recipes.main(["--recipes", "flow", *[a if a != "0" else "1" for a in TOY], "--work", str(work),
                            "--rescore"])


def test_draws_average_the_fid_and_the_floor_over_independent_sets():
    images = bench_recipes.digits_arrays(16)[0]
    second = images[np.random.default_rng(1).choice(len(images), 64, replace=False)]
    one, two = bench_recipes.floor(64, 1), bench_recipes.floor(64, 2)
    assert two == pytest.approx((one + bench_recipes.evaluate(second, "digits", "digits")["fid"]) / 2)
    assert two != pytest.approx(one)


def test_the_table_spreads_fid_over_seeds_and_times_the_fastest():
    rows = [dict(recipe="flow", seed=seed, step=500, sampler="flow_dpmpp", sampling_steps=10, fid=fid,
                 train_s=train_s, sample_s=sample_s)
            for seed, fid, train_s, sample_s in [(0, 0.2, 60.0, 7.0), (1, 0.3, 180.0, 20.0), (2, 0.4, 170.0, 21.0)]]
    (row,) = bench_recipes.summarize(rows, fid_floor=0.2)
    assert (row["fid"], row["fid_min"], row["fid_max"], row["seeds"]) == (pytest.approx(0.3), 0.2, 0.4, 3)
    assert row["vs_floor"] == pytest.approx(1.5)
    assert (row["train_s"], row["sample_s"]) == (60.0, 7.0)      # seed 0's machine, not the slower ones' mean
