"""A grid on a real Dask distributed cluster (a scheduler and two worker processes on 127.0.0.1, started here)."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed (requirements.txt pins it)")
dask = pytest.importorskip("dask")

import dask_helper  # noqa: E402  (registers the test-only "sleepy" runner here; the workers preload it)

from influence_lib import experiments as ex  # noqa: E402
from influence_lib.experiments import dask_executor, store  # noqa: E402

TINY = {"dataset": "iris", "depth": 1, "width": 3, "steps": 60, "loo_steps": 15, "n_random_test": 1,
        "methods": ["exact", "cg"], "weight_decay": 0.01, "damping": 1.0}


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1", preload=[dask_helper.__file__], silence_logs=40) as c:
        yield c


@pytest.fixture(autouse=True)
def _fail_rather_than_hang():
    def fail(*_):
        raise TimeoutError("a Dask test ran past 120 s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _leftovers(folder: Path) -> list[str]:
    """Claims, temporary files and anything that is not a complete record."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".json") or p.name.startswith("."))


@pytest.mark.parametrize("write", ["client", "worker"])
def test_a_grid_on_the_cluster_gives_the_local_records_bit_for_bit(cluster, tmp_path, monkeypatch, write):
    monkeypatch.setenv("IL_DASK_WRITE", write)
    settings = ex.expand(TINY, {"width": [2, 3]}, seeds=[0])
    local = ex.run_grid("t", settings, root=tmp_path / "local", jobs=1, progress=False)
    remote = ex.run_grid("t", settings, root=tmp_path / "dask", progress=False, scheduler=cluster.scheduler_address)
    assert all("error" not in r for r in local + remote)
    assert [r["setting"] for r in remote] == [r["setting"] for r in local]
    assert [r["test_points"] for r in remote] == [r["test_points"] for r in local]
    assert [r["removed"] for r in remote] == [r["removed"] for r in local]
    no_clock = [{k: v for k, v in r.items() if k != "timings"} for r in remote]
    assert no_clock == [{k: v for k, v in r.items() if k != "timings"} for r in local]  # all but the wall clock
    assert [r["versions"]["threads"] for r in remote] == ["1", "1"]  # the client's IL_THREADS, recorded
    assert _leftovers(tmp_path / "dask" / "t") == []
    assert sorted(p.name for p in (tmp_path / "dask" / "t").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "t").iterdir())
    # existing records are skipped: nothing is sent to the cluster again
    mtimes = [p.stat().st_mtime_ns for p in sorted((tmp_path / "dask" / "t").iterdir())]
    ex.run_grid("t", settings, root=tmp_path / "dask", progress=False, scheduler=cluster.scheduler_address)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "dask" / "t").iterdir())] == mtimes


def test_failures_are_recorded_with_their_error(cluster, tmp_path):
    bad = {**TINY, "optimizer": "sgd", "lr": 1e200}
    (rec,) = ex.run_grid("f", [bad], root=tmp_path, progress=False, scheduler=cluster.scheduler_address)
    assert "NonFiniteError" in rec["error"] and "traceback" in rec
    assert store.is_failed(store.read_record(ex.record_path("f", bad, tmp_path)))


@pytest.mark.parametrize("write", ["client", "worker"])
def test_a_worker_killed_in_the_middle_of_a_setting_leaves_nothing_and_it_completes_elsewhere(cluster, tmp_path,
                                                                                              write):
    flags = tmp_path / "flags"
    flags.mkdir()
    slow = {"runner": "sleepy", "seconds": 1.5, "flags": str(flags), "tag": 1}
    killed = []

    def kill_the_first_worker_that_starts():
        deadline = time.time() + 30
        while time.time() < deadline and not killed:
            for f in flags.glob("started-*"):
                pid = int(f.name.split("-")[1])
                assert not list((tmp_path / "grid").glob("*/*.json"))  # nothing written before it finishes
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.05)

    with distributed.Client(cluster.scheduler_address) as c:
        c.wait_for_workers(2, timeout=60)  # the worker killed by the previous test is back: there is another one
    watcher = threading.Thread(target=kill_the_first_worker_that_starts)
    watcher.start()
    bar = _Bar()
    try:
        dask_executor.run_on_dask(cluster.scheduler_address, "k", [slow], str(tmp_path / "grid"), None, False, bar,
                                  write=write)
    finally:
        watcher.join()
    assert len(killed) == 1 and bar.n == 1
    rec = store.read_record(ex.record_path("k", slow, tmp_path / "grid"))
    assert rec is not None and "error" not in rec and rec["value"] == 1 / 7
    assert rec["pid"] != killed[0]  # computed by another worker process
    assert len(list(flags.glob("started-*"))) == 2
    assert _leftovers(tmp_path / "grid" / "k") == []


def test_a_claim_left_by_a_lost_worker_on_another_host_is_taken_over(cluster, tmp_path):
    """Worker-writes mode: the claim of a worker that is gone (on a host whose processes the store cannot see) is
    recognised from the claim events of the cluster and the setting is computed again."""
    s = {"runner": "sleepy", "tag": 2}
    path = ex.record_path("h", s, tmp_path)
    path.parent.mkdir(parents=True)
    ghost = {"host": "a-host-that-is-gone", "pid": 12345, "time": time.time()}
    store._lock_path(path).write_text(json.dumps(ghost))
    with distributed.Client(cluster.scheduler_address) as c:
        c.log_event(dask_executor.CLAIM_TOPIC, {"path": str(path), **ghost, "worker": "tcp://10.9.9.9:1"})
    dask_executor.run_on_dask(cluster.scheduler_address, "h", [s], str(tmp_path), write="worker")
    rec = store.read_record(path)
    assert rec is not None and rec["value"] == 2 / 7 and not store.claimed(path)


def test_a_setting_claimed_by_another_live_client_is_left_to_it(cluster, tmp_path):
    s = {"runner": "sleepy", "tag": 3}
    path = ex.record_path("c", s, tmp_path)
    assert store.claim(path)  # this (live) process holds the claim, as another sweep would
    bar = _Bar()
    dask_executor.run_on_dask(cluster.scheduler_address, "c", [s], str(tmp_path), bar=bar)
    assert bar.n == 1 and store.read_record(path) is None and store.claimed(path)
    store.release(path)


def test_bad_write_mode_and_unreachable_scheduler_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("IL_DASK_WRITE", "nowhere")
    with pytest.raises(ValueError, match="IL_DASK_WRITE"):
        dask_executor.run_on_dask("tcp://127.0.0.1:1", "x", [TINY], str(tmp_path))
    monkeypatch.delenv("IL_DASK_WRITE")
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            pytest.raises(OSError, match="could not reach the Dask scheduler"):
        dask_executor.run_on_dask("tcp://127.0.0.1:1", "x", [TINY], str(tmp_path))


class _Bar:
    n = 0

    def update(self, k=1):
        self.n += k
