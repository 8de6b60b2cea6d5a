"""The LOO-noise study: records, caching and the summary."""

import pytest

from influence_lib.experiments.noise import noise_key, noise_summary, run_noise_grid, run_noise_setting

TINY = {"dataset": "iris", "n_train": 60, "n_test": 20, "width": 4, "steps": 200, "k": 3, "method": "exact",
        "runs": [{"steps": 20, "batch_size": None, "seed": 0}, {"steps": 40, "batch_size": None, "seed": 0},
                 {"steps": 20, "batch_size": 10, "seed": 0}, {"steps": 20, "batch_size": 10, "seed": 1}]}


def test_noise_record_and_summary():
    r = run_noise_setting(TINY)
    assert len(r["runs"]) == 4 and len(r["removed"]) >= 3
    rows = noise_summary(r)
    assert [row["role"] for row in rows] == ["highest", "median"]
    assert rows[0]["noise_sd_seed"] >= 0 and rows[0]["noise_sd_steps"] >= 0
    assert len(rows[0]["pred_vs_run_spearman"]) == 4


def test_noise_grid_caches(tmp_path):
    a = run_noise_grid("n", [TINY], root=tmp_path)
    files = list((tmp_path / "n").glob("*.json"))
    assert len(files) == 1 and files[0].stem == noise_key(TINY)
    b = run_noise_grid("n", [TINY], root=tmp_path)
    assert a == b


def test_noise_rejects_unknown_key():
    with pytest.raises(ValueError, match="unknown key"):
        noise_key({"nope": 1})
