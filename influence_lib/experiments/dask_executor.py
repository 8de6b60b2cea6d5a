"""The Dask distributed back end of the executor: ``run_grid(..., scheduler="tcp://host:8786")``.

:func:`run_on_dask` connects to an existing ``dask.distributed`` scheduler (``dask.distributed.Client(address)``)
and submits one task per setting still to compute; the client shows the progress bar. The semantics are those of
the local executor (:mod:`.executor`):

* **existing records are skipped** (by :func:`.executor.run_grid`, and again here just before a setting is sent);
* **each setting is claimed before it is computed** (:func:`.store.claim`), so two clients on one grid never
  compute a setting twice; a setting claimed by another live process is left to it (``run_grid`` waits for it);
* **a setting whose worker is lost is computed on another worker**: the scheduler reschedules the task of a dead
  worker (up to ``distributed.scheduler.allowed-failures`` times), and the task is also submitted with
  ``retries=`` (``IL_DASK_RETRIES``, default 2) for an exception outside the computation. This is safe because a
  task is idempotent: it has no side effect until its very end, where the record is written atomically (a
  temporary file renamed into place, :func:`.store.write_atomic`), so a worker killed in the middle of a setting
  leaves no partial record behind;
* **failures are recorded with their error**: a failing setting becomes an error record on the worker
  (:func:`.executor.compute_record`), and a task that cannot complete at all (``KilledWorker``: every worker that
  tried it died) becomes an error record written by the client; both are computed again on the next run;
* **results do not depend on where they ran**: each setting is computed with the client's ``IL_THREADS`` torch
  threads (default 1, recorded in the record's ``versions.threads``), and one setting at a time per worker process
  (a worker started with ``--nthreads 4`` runs its settings one after the other: torch's thread count and the
  seeded global RNG that initialises a model are per process), so a record computed on a Dask worker is
  bit-identical to the local executor's. Start workers with ``--nthreads 1`` and as many ``--nworkers`` as cores.

Two write modes (``write=`` or ``IL_DASK_WRITE``):

``client`` (the default)
    The client claims each setting before submitting it, the worker only computes and returns the record, and the
    client writes it (:func:`.store.write_atomic`) and releases the claim. Default because it needs nothing from
    the workers but the package: no shared file system between client and workers, no write permission on the
    store for the workers' user, and the claim is held by the client, a live process on the machine that owns the
    store, whose death is detected at once by the next sweep on that machine (a claim of a worker on another host
    could only be recognised as stale after ``IL_CLAIM_TIMEOUT``). Records travel back through the scheduler (a
    few MB per setting at most).
``worker``
    Each task runs :func:`.executor.work` on the worker: it claims the setting in the store, computes it, writes
    the record and releases the claim. For stores on a file system shared by the client and every worker (same
    path everywhere), when records are too large to send back or the client's link is slow. A claim left by a
    worker that died is recognised (each task reports which worker claimed what as a Dask event, kept in the
    scheduler's event log) and taken over; one the log no longer holds waits for ``IL_CLAIM_TIMEOUT``, as in
    :mod:`.store`.

Environment: ``IL_SCHEDULER`` (the address, read by :func:`.executor.run_grid`), ``IL_DASK_WRITE`` (``client`` or
``worker``), ``IL_DASK_RETRIES`` (default 2), ``IL_THREADS`` (torch threads per setting, default 1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import executor, store
from .record import error_record
from .runners import normalize_any, setting_key

WRITE_MODES = ("client", "worker")
#: the Dask event topic on which worker-writes tasks report their claims
CLAIM_TOPIC = "influence-lib-claims"


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


#: one setting at a time per worker process, whatever its number of threads
_LOCK = threading.Lock()


def _compute(setting: dict[str, Any], kind: str | None, threads: int) -> dict[str, Any]:
    """Task of the client-writes mode: the record of ``setting`` (its error record if it fails)."""
    os.environ["IL_THREADS"] = str(threads)
    with _LOCK:
        return executor.compute_record(setting, kind)


def _work(name: str, setting: dict[str, Any], root: str, kind: str | None, recompute: bool,
          threads: int) -> tuple[str, bool]:
    """Task of the worker-writes mode: :func:`.executor.work` on the worker (claim, compute, write, release)."""
    os.environ["IL_THREADS"] = str(threads)
    with _LOCK:
        try:
            from distributed import get_worker

            get_worker().log_event(CLAIM_TOPIC, {"path": str(executor.record_path(name, setting, root, kind)),
                                                 "host": socket.gethostname(), "pid": os.getpid(),
                                                 "worker": get_worker().address})
        except Exception:  # not on a worker (called directly): nothing to report
            pass
        return executor.work(name, setting, root, kind, recompute)


def write_mode(write: str | None = None) -> str:
    mode = write or os.environ.get("IL_DASK_WRITE") or "client"
    if mode not in WRITE_MODES:
        raise ValueError(f"the Dask write mode (IL_DASK_WRITE) must be one of {list(WRITE_MODES)}, got {mode!r}")
    return mode


def _retries(retries: int | None) -> int:
    n = os.environ.get("IL_DASK_RETRIES", "2") if retries is None else str(retries)
    if not n.isdigit():
        raise ValueError(f"IL_DASK_RETRIES must be a non-negative integer, got {n!r}")
    return int(n)


def _task_key(mode: str, name: str, setting: dict[str, Any], kind: str | None, attempt: int = 0) -> str:
    return f"influence-lib-{mode}-{name}-{setting_key(setting, kind)}" + (f"-takeover{attempt}" if attempt else "")


def _done(path: Path) -> bool:
    rec = store.read_record(path)
    return rec is not None and not store.is_failed(rec)


def _failure(setting: dict[str, Any], kind: str | None, e: BaseException) -> dict[str, Any]:
    return error_record(normalize_any(setting, kind), e, traceback.format_exc(limit=5), "")


def connect(address: str):
    """A ``dask.distributed.Client`` of the scheduler at ``address`` (a clear error if it cannot be reached)."""
    if importlib.util.find_spec("distributed") is None:
        raise ImportError("a scheduler address was given but dask.distributed is not installed: "
                          "pip install -r requirements.txt (it pins dask and distributed)")
    from distributed import Client

    try:
        return Client(address, set_as_default=False)
    except OSError as e:
        raise OSError(f"could not reach the Dask scheduler at {address!r}: {e}") from e


def _check_workers(client) -> None:
    workers = client.scheduler_info()["workers"]
    if not workers:
        warnings.warn("the Dask cluster has no workers yet: settings wait until one joins", stacklevel=3)
    many = sorted({w["nthreads"] for w in workers.values() if w["nthreads"] > 1})
    if many:
        warnings.warn(f"Dask workers with {many} threads run one setting at a time each (records must not depend "
                      "on what ran beside them): start them with --nthreads 1 and more --nworkers", stacklevel=3)


def run_on_dask(address: str, name: str, todo: Sequence[dict[str, Any]], root: str, kind: str | None = None,
                recompute: bool = False, bar: Any = None, *, write: str | None = None,
                retries: int | None = None) -> None:
    """Compute (and store under ``root``) the records of ``todo`` on the Dask cluster at ``address``.

    ``bar``: updated once per finished setting; ``write``: ``"client"`` (default, ``IL_DASK_WRITE``) or
    ``"worker"`` (see the module docstring); ``retries``: Dask retries of a task that raised (``IL_DASK_RETRIES``,
    default 2). Settings claimed by another live process are left to it (:func:`.executor.run_grid` waits).
    """
    mode = write_mode(write)
    retries = _retries(retries)
    threads = executor.threads_per_setting()  # the client's thread count, for every worker
    bar = bar or _NoBar()
    client = connect(address)
    try:
        _check_workers(client)
        if mode == "client":
            _client_writes(client, name, todo, root, kind, recompute, bar, threads, retries)
        else:
            _worker_writes(client, name, todo, root, kind, recompute, bar, threads, retries)
    finally:
        client.close()


def _client_writes(client, name, todo, root, kind, recompute, bar, threads, retries) -> None:
    from distributed import as_completed

    futures: dict[Any, tuple[dict[str, Any], Path]] = {}
    try:
        for s in todo:
            path = executor.record_path(name, s, root, kind)
            if (not recompute and _done(path)) or not store.claim(path):
                bar.update(1)  # computed meanwhile, or claimed by another live process (run_grid waits for it)
                continue
            try:
                fut = client.submit(_compute, s, kind, threads, key=_task_key("compute", name, s, kind),
                                    retries=retries, pure=False)
            except BaseException:
                store.release(path)
                raise
            futures[fut] = (s, path)
        for fut in as_completed(list(futures), loop=client.loop):
            s, path = futures.pop(fut)
            try:
                try:
                    rec = fut.result()
                except Exception as e:  # e.g. KilledWorker: every worker that tried it died
                    rec = _failure(s, kind, e)
                store.write_atomic(path, rec)
            finally:
                store.release(path)
                fut.release()
            bar.update(1)
    finally:  # interrupted: nothing more is computed for this client, and its claims go
        for fut, (_, path) in futures.items():
            fut.cancel()
            store.release(path)


def _dead_claims(client, paths: Sequence[Path]) -> list[Path]:
    """Of ``paths``, those whose claim is held by a worker of this cluster that is gone (per the claim events)."""
    live = set(client.scheduler_info()["workers"])
    claims: dict[str, list[dict[str, Any]]] = {}
    for _, msg in client.get_events(CLAIM_TOPIC):
        if isinstance(msg, dict) and "path" in msg:
            claims.setdefault(msg["path"], []).append(msg)
    out = []
    for p in paths:
        if not store.claimed(p):
            continue
        try:
            holder = json.loads(store._lock_path(Path(p)).read_text() or "{}")
        except (OSError, ValueError):
            continue
        if any(m.get("worker") not in live and (m.get("host"), m.get("pid")) == (holder.get("host"), holder.get("pid"))
               for m in claims.get(str(p), [])):
            out.append(Path(p))
    return out


def _worker_writes(client, name, todo, root, kind, recompute, bar, threads, retries) -> None:
    from distributed import as_completed

    pending = [s for s in todo if recompute or not _done(executor.record_path(name, s, root, kind))]
    for _ in range(len(todo) - len(pending)):
        bar.update(1)
    for attempt in range(retries + 2):
        futures = {client.submit(_work, name, s, root, kind, recompute, threads, retries=retries, pure=False,
                                 key=_task_key("work", name, s, kind, attempt)): s for s in pending}
        try:
            again = []
            for fut in as_completed(list(futures), loop=client.loop):
                s = futures.pop(fut)
                path = executor.record_path(name, s, root, kind)
                try:
                    _, computed = fut.result()
                    if computed or _done(path) or attempt == retries + 1 or not _dead_claims(client, [path]):
                        bar.update(1)  # done, or claimed by another live process (run_grid waits for it)
                        continue
                except Exception as e:  # e.g. KilledWorker: the client records the failure
                    for p in _dead_claims(client, [path]):
                        store.release(p)
                    if store.claim(path):
                        try:
                            store.write_atomic(path, _failure(s, kind, e))
                        finally:
                            store.release(path)
                    bar.update(1)
                    continue
                finally:
                    fut.release()
                store.release(path)  # its claim belongs to a worker that died: compute it again
                again.append(s)
        finally:
            for fut in futures:
                fut.cancel()
        if not again:
            return
        pending = again
