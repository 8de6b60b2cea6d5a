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


def test_run_lengths_in_epochs_mean_the_same_passes_at_every_size():
    from influence_lib.experiments.noise import run_steps

    assert run_steps({"epochs": 20, "batch_size": 50, "seed": 0}, 150) == 60
    assert run_steps({"epochs": 20, "batch_size": 50, "seed": 0}, 1200) == 480
    assert run_steps({"epochs": 20, "batch_size": 50, "seed": 0}, 1201) == 500  # the last, partial batch counts
    assert run_steps({"epochs": 7, "batch_size": None, "seed": 0}, 1200) == 7  # full batch: one step per epoch
    assert run_steps({"steps": 33, "batch_size": 50, "seed": 0}, 1200) == 33


def test_an_epoch_protocol_records_the_steps_it_took():
    s = {**TINY, "runs": [{"epochs": 3, "batch_size": None, "seed": 0}, {"epochs": 2, "batch_size": 10, "seed": 0}]}
    r = run_noise_setting(s)
    assert [run["steps"] for run in r["runs"]] == [3, 2 * 6]  # n_train 60, batches of 10


@pytest.mark.parametrize("runs", [[{"batch_size": None, "seed": 0}],
                                  [{"steps": 5, "epochs": 5, "batch_size": None, "seed": 0}],
                                  [{"epochs": 0, "batch_size": None, "seed": 0}]])
def test_a_run_needs_exactly_one_positive_length(runs):
    with pytest.raises(ValueError, match="steps|epochs"):
        noise_key({**TINY, "runs": runs})
