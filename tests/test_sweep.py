"""The apparatus: records, the store, resumable sweeps, claims, early validation, the command line."""

import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from influence_lib import experiments as ex
from influence_lib.experiments import executor, presets, run_influence, stats, store
from influence_lib.experiments.record import corr, rerun_difference
from influence_lib.experiments.runners import normalize_any
from influence_lib.experiments.settings import normalize_setting
from influence_lib.experiments.sweep import build_settings, main
from influence_lib.metrics import top_k

TINY = {"dataset": "iris", "depth": 1, "width": 3, "steps": 60, "loo_steps": 15, "n_random_test": 1,
        "methods": ["exact", "cg"], "weight_decay": 0.01, "damping": 1.0}
REPO = store.book_root(os.path.dirname(__file__))


def test_record_contents_and_determinism():
    a = run_influence.run_setting(TINY)
    assert a["schema"] == 2 and a["kind"] == "influence"
    assert a["dataset"]["name"] == "iris" and not a["dataset"]["substitute"]
    assert len(a["removed"]) == a["dataset"]["n_train"] == 120
    assert [p["role"] for p in a["test_points"]] == ["highest", "median", "random"]
    p = a["test_points"][0]
    assert len(p["predicted"]) == len(p["actual"]) == 120
    assert -1 <= p["all"]["spearman"] <= 1
    assert p["estimators"]["cg"]["relative_error"] < 1e-6
    assert a["spectrum"]["lambda_max"] > 0
    assert len(a["param_change_norms"]["predicted"]) == 120
    assert {"healthy", "reasons", "train_accuracy", "chance_accuracy", "grad_norm"} <= set(a["health"])
    b = run_influence.run_setting(TINY)
    assert a["test_points"] == b["test_points"]  # a rerun reproduces the record's numbers


def test_stored_metrics_are_recomputed_exactly_from_the_stored_vectors(tmp_path):
    """Lossless records: every correlation in a record is what the stored vectors give, to the last bit."""
    (rec,) = ex.run_grid("t", [TINY], root=tmp_path, jobs=1, progress=False)
    assert "error" not in rec
    for tp in rec["test_points"]:
        pred, act = np.array(tp["predicted"]), np.array(tp["actual"])
        assert corr(pred, act) == tp["all"]
        k = min(rec["setting"]["k"], len(pred))
        top = top_k(pred, k)
        assert corr(pred[top], act[top]) == tp[f"top{k}_influence"]


def test_sweep_is_resumable_and_atomic(tmp_path, monkeypatch):
    settings = ex.expand(TINY, {"width": [2, 3]}, seeds=[0])
    recs = ex.run_grid("t", settings, root=tmp_path, jobs=1, progress=False)
    assert len(recs) == 2 and all("error" not in r for r in recs)
    paths = sorted((tmp_path / "t").glob("*.json"))
    assert len(paths) == 2
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in paths)  # readable by the team, not 0600
    mtimes = [p.stat().st_mtime_ns for p in paths]
    calls = []
    real = run_influence.run_setting
    monkeypatch.setattr(run_influence, "run_setting", lambda s: calls.append(s) or real(s))
    ex.run_grid("t", settings, root=tmp_path, jobs=1, progress=False)
    assert calls == [] and [p.stat().st_mtime_ns for p in paths] == mtimes  # nothing recomputed
    paths[0].unlink()  # an interrupted sweep: one record missing
    again = ex.run_grid("t", settings, root=tmp_path, jobs=1, progress=False)
    assert len(calls) == 1
    assert [r["test_points"] for r in again] == [r["test_points"] for r in recs]
    assert not list((tmp_path / "t").glob("*.lock"))  # every claim released


def test_write_atomic_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "r.json"

    def broken_dump(obj, f, **kw):
        f.write('{"partial": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        ex.write_atomic(target, {"a": 1})
    assert not target.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(ValueError):
        ex.write_atomic(target, {"a": float("nan")})  # non-finite values never reach a record
    assert not target.exists()


def test_a_corrupt_record_is_named_set_aside_and_computed_again(tmp_path):
    (rec,) = ex.run_grid("t", [TINY], root=tmp_path, jobs=1, progress=False)
    path = ex.record_path("t", TINY, tmp_path)
    path.write_text(path.read_text()[:100])  # truncated
    with pytest.warns(store.CorruptRecordWarning, match=path.name):
        (again,) = ex.run_grid("t", [TINY], root=tmp_path, jobs=1, progress=False)
    assert again["test_points"] == rec["test_points"]
    assert path.with_name(path.name + ".corrupt").exists()


def test_failures_are_recorded_and_computed_again_on_the_next_run(tmp_path, monkeypatch):
    bad = {**TINY, "optimizer": "sgd", "lr": 1e200}
    (rec,) = ex.run_grid("f", [bad], root=tmp_path, jobs=1, progress=False)
    assert "NonFiniteError" in rec["error"]
    ok, failed = ex.split_failed([rec])
    assert ok == [] and failed == [rec]
    assert len(ex.to_frame([rec])) == 0
    # a cached error never outlives its cause: the next run computes the setting again
    calls = []
    monkeypatch.setattr(run_influence, "run_setting", lambda s: calls.append(s) or {"setting": s, "fixed": True})
    (again,) = ex.run_grid("f", [bad], root=tmp_path, jobs=1, progress=False)
    assert len(calls) == 1 and again.get("fixed") and "error" not in again


def test_bad_settings_fail_before_any_work():
    with pytest.raises(ValueError, match="unknown key"):
        ex.expand(TINY, {"depht": [1]})
    with pytest.raises(ValueError, match="methods"):
        normalize_setting({"methods": ["newton"]})
    with pytest.raises(ValueError, match="remove"):
        normalize_setting({"remove": "some"})
    for key, value in [("depth", 0), ("depth", "a"), ("width", -1), ("damping", -1.0), ("loo_steps", 1e3),
                       ("lr", 0), ("seed", -1), ("model", "transformer"), ("dtype", "float16")]:
        with pytest.raises(ValueError, match=key):
            normalize_setting({**TINY, key: value})
    with pytest.raises(ValueError, match="seeds"):
        ex.expand(TINY, {}, seeds=[])
    # the closed-form full-batch LiSSA needs the exact eigendecomposition and the mini-batch run's scale
    with pytest.raises(ValueError, match="lissa_truncated"):
        normalize_setting({**TINY, "methods": ["exact", "lissa"], "lissa_truncated": True})
    with pytest.raises(ValueError, match="lissa_truncated"):
        normalize_setting({**TINY, "methods": ["cg", "lissa"], "lissa_truncated": True,
                           "method_options": {"lissa": {"scale": 10.0}}})
    assert "lissa_truncated" not in normalize_setting({**TINY, "lissa_truncated": False})  # a default: no new key


def test_the_full_batch_lissa_of_a_record_is_truncation_alone(tmp_path):
    """With lissa_truncated, a record's "lissa-truncated" estimator is the full-batch LiSSA of the same scale and
    depth: its truncation factor is (1 - mu_min / scale)^(depth + 1) of the recorded spectrum, and its distance
    from the exact scores shrinks to nothing as the depth grows."""
    base = {**TINY, "methods": ["exact", "lissa"], "lissa_truncated": True}  # damping 1: mu_min / scale ~ 0.02
    errs, factors = [], []
    for depth in (20, 3000):
        s = {**base, "method_options": {"lissa": {"scale": 50.0, "depth": depth, "batch_size": 10}}}
        (rec,) = ex.run_grid("lt", [s], root=tmp_path, jobs=1, progress=False)
        info, spec = rec["methods"]["lissa-truncated"], rec["spectrum"]
        mu_min = spec["lambda_min"] + s["damping"]
        assert info["n_divergent"] == 0
        assert info["truncation_factor"] == pytest.approx((1 - mu_min / 50.0) ** (depth + 1), rel=1e-6)
        errs.append(max(tp["estimators"]["lissa-truncated"]["relative_error"] for tp in rec["test_points"]))
        factors.append(info["truncation_factor"])
    assert factors[1] < 1e-20 and errs[1] < 1e-10  # converged: the exact scores
    assert errs[0] > 1e-2  # 20 terms of the series are far from them


def test_a_loo_replicate_under_the_same_protocol_reproduces_the_loo_and_others_differ():
    """The noise ceiling's replicates: one under the setting's own protocol gives the record's LOO of the same
    removals (to rounding: the stack holds fewer models), so its agreement is 1; a cold start from another seed
    gives other numbers, and the record's claims read the ceiling from the stored vectors."""
    from influence_lib.experiments import claims

    # trained to a stationary point (the ceiling reads healthy models only)
    s = {**TINY, "steps": 400, "lr": 0.05, "lr_schedule": "cosine", "remove": "top", "k": 6, "n_random_test": 0,
         "loo_replicates": [{"steps": TINY["loo_steps"]},
                            {"warm_start": False, "seed": 1000, "steps": 400, "lr": 0.05, "lr_schedule": "cosine"}],
         "loo_replicate_k": 4}
    rec = run_influence.run_setting(s)
    assert stats.health_of(rec)["healthy"], stats.health_of(rec)["reasons"]
    pos = rec["loo_replicates"]["positions"]
    assert 4 <= len(pos) <= 8 and pos == sorted(set(pos))
    for tp in rec["test_points"]:
        a = np.array(tp["actual"])[pos]
        same, cold = tp["replicates"]
        np.testing.assert_allclose(same["actual"], a, rtol=1e-9, atol=1e-12)
        assert not np.allclose(cold["actual"], a, rtol=1e-3)
        assert corr(a, cold["actual"]) == cold["vs_loo"]
    assert [p["protocol"] for p in rec["loo_replicates"]["protocols"]] == s["loo_replicates"]
    ceiling = claims.noise_ceiling([rec], {"rule": "all", "roles": None})
    assert [c["label"] for c in ceiling] == list(claims.CEILING_LABELS)
    assert ceiling[0]["mean"] == pytest.approx(np.tanh(np.arctanh(0.9999)), abs=1e-9)  # 1, clipped for Fisher z
    assert -1 < ceiling[1]["mean"] < 1 and ceiling[1]["n"] == 1
    with pytest.raises(ValueError, match="loo_replicates"):
        normalize_setting({**TINY, "loo_replicates": [{"momentum": 0.9}]})


def test_a_cosine_schedule_decays_the_learning_rate_step_by_step():
    """lr_schedule="cosine": step t of T uses lr (1 + cos(pi (t - 1) / T)) / 2. Gradient descent on a quadratic
    (a / 2) theta^2 therefore ends at prod_t (1 - lr_t a) theta_0 exactly; the setting key reaches the training."""
    from influence_lib.retrain import TrainConfig, minimize_stacked

    cfg = TrainConfig(optimizer="sgd", lr=0.1, steps=7, lr_schedule="cosine")
    assert [cfg.lr_at(t) for t in (1, 7)] == pytest.approx([0.1, 0.1 * (1 + np.cos(6 * np.pi / 7)) / 2])
    assert "lr_schedule" not in TrainConfig().to_dict() and cfg.to_dict()["lr_schedule"] == "cosine"
    a = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    theta0 = torch.ones(3, 1, dtype=torch.float64)
    out = minimize_stacked(lambda th, rows: 0.5 * a * th[:, 0] ** 2, theta0, 1, cfg)
    expected = torch.tensor([np.prod([1 - cfg.lr_at(t) * float(ai) for t in range(1, 8)]) for ai in a])
    torch.testing.assert_close(out[:, 0], expected.double(), rtol=1e-14, atol=1e-15)
    const = minimize_stacked(lambda th, rows: 0.5 * a * th[:, 0] ** 2, theta0, 1,
                             TrainConfig(optimizer="sgd", lr=0.1, steps=7))
    torch.testing.assert_close(const[:, 0], (1 - 0.1 * a) ** 7, rtol=1e-14, atol=1e-15)
    r1 = run_influence.run_setting({**TINY, "methods": ["exact"]})
    r2 = run_influence.run_setting({**TINY, "methods": ["exact"], "lr_schedule": "cosine", "loo_lr_schedule": "cosine"})
    assert r1["training"]["loss"] != r2["training"]["loss"] and r1["test_points"][0]["actual"] != \
        r2["test_points"][0]["actual"]
    with pytest.raises(ValueError, match="lr_schedule"):
        normalize_setting({**TINY, "lr_schedule": "linear"})


def test_equal_numbers_are_one_setting_and_one_key():
    assert ex.setting_key({**TINY, "weight_decay": 0}) == ex.setting_key({**TINY, "weight_decay": 0.0})
    assert ex.setting_key({**TINY, "damping": 1}) == ex.setting_key(TINY)
    assert ex.setting_key(TINY) == ex.setting_key(dict(reversed(list(TINY.items()))))
    assert ex.setting_key(TINY) == ex.setting_key({**TINY, "loo_reference": "retrained"})  # a default
    assert ex.setting_key(TINY) != ex.setting_key({**TINY, "seed": 1})


def test_every_committed_record_has_the_key_of_its_setting_and_belongs_to_a_book_grid():
    """The store's keys are stable across refactors: each committed file is named by the hash of its setting,
    and every book grid's settings map onto committed files (so the book renders without recomputing)."""
    if REPO is None or not (REPO / "results").is_dir():
        pytest.skip("no checkout with committed records")
    for name in presets.GRIDS:
        folder = REPO / "results" / name
        if not folder.is_dir():
            assert name in presets.INCOMPLETE, f"{name}: no committed records"
            continue
        kind = presets.KINDS.get(name)
        for p in folder.glob("*.json"):
            assert ex.setting_key(json.loads(p.read_text())["setting"], kind) == p.stem, p
        keys = {ex.setting_key(s, kind) for s in presets.settings(name, "default")}
        complete = keys <= {p.stem for p in folder.glob("*.json")}
        # a grid is complete unless presets.INCOMPLETE says why not; an entry there must go once it is complete
        assert complete != (name in presets.INCOMPLETE), (name, presets.INCOMPLETE.get(name))


def _committed(name):
    folder = REPO / "results" / name if REPO else None
    if folder is None or not folder.is_dir():
        pytest.skip(f"no committed {name} records")
    recs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    recs = [r for r in recs if "error" not in r]
    if not recs:
        pytest.skip(f"no successful committed {name} records")
    return min(recs, key=lambda r: r["timings"]["total"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convex-iris", "pbrf", "mnist", "iris"])
def test_a_committed_record_is_reproduced_by_rerunning_its_setting(name):
    """The book's records are not frozen numbers: rerunning the cheapest committed record of a sweep gives the
    same removals (up to the choice among tied values) and the same predicted and actual loss changes. Records of
    schema 1 kept 8 significant digits; BLAS kernels may differ in the last bits across machines, hence rtol 1e-6 on
    the rounded values. (The cheapest record of each sweep that runs in seconds; the other sweeps are checked by
    benchmarks/rerun_records.py.)"""
    rec = _committed(name)
    again = run_influence.run_setting(rec["setting"])
    worst, mismatches, vectors = rerun_difference(again, rec)
    assert not mismatches and vectors > 0
    assert worst <= 1e-6
    # (not the correlations: on partly dead models many values are near-ties, whose ranks flip with last-bit
    # differences of the vectors; the vectors are what is reproduced, the correlations follow from them)


def test_a_rerun_differs_from_its_record_only_where_the_mathematics_decides():
    rec = {"setting": {"remove": "top", "k": 2}, "removed": [3, 5, 7],
           "test_points": [{"index": 0, "role": "median", "predicted": [2.0, -2.0, 1.0], "actual": [0.1, 0.2, 0.3]}]}
    # point 9 has the same value as 5 (a tie): the pool holds it instead; the common points agree
    tied = {"removed": [3, 7, 9],
            "test_points": [{"index": 0, "role": "median", "predicted": [2.0, 1.0, 2.0], "actual": [0.1, 0.3, 0.9]}]}
    worst, mismatches, vectors = rerun_difference(tied, rec)
    assert mismatches == [] and worst == 0.0 and vectors == 2
    other = {"removed": [3, 7, 9],
             "test_points": [{"index": 0, "role": "median", "predicted": [2.0, 1.0, 1.5], "actual": [0.1, 0.3, 0.9]}]}
    assert rerun_difference(other, rec)[1] == ["the top-2 predicted values of test point 0 differ"]
    drift = {**rec, "test_points": [{**rec["test_points"][0], "actual": [0.1, 0.2, 0.31]}]}
    assert rerun_difference(drift, rec)[0] == pytest.approx(0.01 / 0.3)
    everything = {**rec, "setting": {"remove": "all"}}
    assert rerun_difference(tied, everything)[1] == ["removals differ"]


def test_a_setting_claimed_by_a_live_process_is_not_computed_twice(tmp_path, monkeypatch):
    """Two sweeps of one grid: a setting another live process has claimed is left to it and waited for."""
    settings = ex.expand(TINY, {"width": [2, 3]}, seeds=[0])
    first = run_influence.run_setting(settings[1])
    other = ex.record_path("c", settings[1], tmp_path)
    other.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other.with_suffix(".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid,
                                                          "time": time.time()}))
        calls = []
        real = run_influence.run_setting

        def fake_run(s):
            calls.append(s)
            # while this sweep computes its first setting, "the other sweep" finishes the second and releases it
            store.write_atomic(other, first)
            store.release(other)
            return real(s)

        monkeypatch.setattr(run_influence, "run_setting", fake_run)
        recs = ex.run_grid("c", settings, root=tmp_path, jobs=1, progress=False)
    finally:
        holder.kill()
    assert calls == [settings[0]] and recs[1]["test_points"] == first["test_points"]


def test_a_claim_of_a_dead_process_is_taken_over(tmp_path):
    path = ex.record_path("d", TINY, tmp_path)
    path.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.with_suffix(".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "time": 0}))
    assert store.claim(path)
    store.release(path)


def test_records_do_not_depend_on_the_number_of_jobs(tmp_path):
    settings = ex.expand(TINY, {"width": [2, 3]}, seeds=[0])
    a = ex.run_grid("j1", settings, root=tmp_path, jobs=1, progress=False)
    b = ex.run_grid("j2", settings, root=tmp_path, jobs=2, progress=False)
    assert [r["test_points"] for r in a] == [r["test_points"] for r in b]
    assert {r["versions"]["threads"] for r in a + b} == {str(executor.threads_per_setting())}


def test_the_command_line_refuses_a_bad_grid_before_any_work(tmp_path, capsys):
    for argv, message in [(["nosuch"], "sweep name must be one of"), (["iris", "--seeds", "0"], "count must be"),
                          (["iris", "--seeds", "-1"], "seeds"), (["iris", "--grid", "depth=a"], "depth"),
                          (["iris", "--grid", "depth=0"], "depth"), (["iris", "--set", "width=-1"], "width"),
                          (["iris", "--set", "damping=-1"], "damping"),
                          (["iris", "--set", "loo_steps=1e3"], "loo_steps"), (["iris", "--jobs", "0"], "jobs")]:
        t = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            main([*argv, "--results", str(tmp_path)])
        assert e.value.code == 2 and time.perf_counter() - t < 1.0
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_user_runs_go_to_their_own_folder_and_the_book_grid_to_the_records(monkeypatch, tmp_path):
    monkeypatch.setenv("IL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("IL_RESULTS", str(tmp_path / "results"))
    assert store.runs_dir("default") == tmp_path / "runs"
    assert store.results_dir("quick") == tmp_path / "results" / "quick"
    book = build_settings("iris", [], [], None, True, "quick")
    assert len(book) == len(presets.settings("iris", "quick"))
    mine = build_settings("iris", ["depth=1"], ["steps=20"], "2", False, "quick")
    assert [s["seed"] for s in mine] == [0, 1] and all(normalize_any(s)["steps"] == 20 for s in mine)


def test_the_library_imports_nothing_of_the_apparatus_or_the_checkout(tmp_path):
    """`import influence_lib` from outside the checkout loads no apparatus module and touches no repository path."""
    code = ("import sys, influence_lib as il; "
            "bad = [m for m in sys.modules if m.startswith('influence_lib.experiments')]; "
            "assert not bad, bad; print('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO) if REPO else ""}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


SWEEP_SCRIPT = r"""
import sys
from influence_lib import experiments as ex
slow = {"dataset": "iris", "depth": 2, "width": 5, "steps": 200000, "loo_steps": 15, "n_random_test": 1,
        "methods": ["exact"]}
if __name__ == "__main__":
    ex.run_grid("k", ex.expand(slow, {"width": [4, 5]}, seeds=[0]), root=sys.argv[1], jobs=2, progress=False)
"""


@pytest.mark.slow
def test_a_killed_sweep_leaves_no_worker_computing_and_no_partial_record(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "store")])
    try:
        deadline = time.time() + 60
        children = []
        while time.time() < deadline and len(children) < 2:
            time.sleep(0.5)
            children = [c for c in psutil.Process(parent.pid).children(recursive=True)
                        if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(children) >= 2, "the sweep did not start its workers"
        time.sleep(2)
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)  # each worker polls its parent every 0.5 s
        assert not alive, f"workers still running after their sweep was killed: {alive}"
    finally:
        if parent.poll() is None:
            parent.kill()
    for p in (tmp_path / "store" / "k").glob("*.json"):
        json.loads(p.read_text())  # nothing half-written (only complete records, if any)
    # the claims of the dead workers are taken over by the next sweep
    for lock in (tmp_path / "store" / "k").glob("*.lock"):
        assert store.claim(lock.with_suffix(".json"))


def test_theta_stack_trains_a_block_of_seeds_once_and_each_record_matches_training_alone(monkeypatch):
    """theta_stack=3: seeds 3, 4, 5 form one block, trained in one stack once per process (the next seed of the block
    reuses it); each record equals the record of its seed trained alone, to rounding; the block is recorded and is
    part of the setting's key; mini-batch training is refused before any work."""
    from influence_lib.experiments import stages

    assert "theta_stack" not in normalize_setting({**TINY, "theta_stack": 1})  # the default: keys unchanged
    assert normalize_setting({**TINY, "theta_stack": 3})["theta_stack"] == 3
    assert ex.setting_key({**TINY, "theta_stack": 3}) != ex.setting_key(TINY)
    with pytest.raises(ValueError, match="full batch"):
        normalize_setting({**TINY, "theta_stack": 3, "batch_size": 10})
    with pytest.raises(ValueError, match="theta_stack"):
        normalize_setting({**TINY, "theta_stack": 0})
    calls = []
    real = stages.train_stack
    monkeypatch.setattr(stages, "train_stack", lambda *a, **k: calls.append(a[3].shape) or real(*a, **k))
    monkeypatch.setattr(stages, "_STACKS", {})
    for seed in (4, 5):
        stacked = run_influence.run_setting({**TINY, "theta_stack": 3, "seed": seed})
        alone = run_influence.run_setting({**TINY, "seed": seed})
        assert stacked["training"]["theta_stack"] == [3, 4, 5]
        assert stacked["training"]["loss"] == pytest.approx(alone["training"]["loss"], rel=1e-10)
        assert stacked["removed"] == alone["removed"]
        for a, b in zip(stacked["test_points"], alone["test_points"], strict=True):
            np.testing.assert_allclose(a["predicted"], b["predicted"], rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(a["actual"], b["actual"], rtol=1e-7, atol=1e-12)
    assert calls == [torch.Size([3, stacked["model"]["n_params"]])]  # one stack of 3 for both records
