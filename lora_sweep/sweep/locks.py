"""A study-wide lock shared by every worker of a study, in any process and on any machine that shares
its storage.

Deciding whether to start another trial reads the study (finished + running < n_trials) and then asks
for a trial: two workers doing this at the same moment both see room for one more and overshoot
``n_trials``. Holding this lock across "count, ask, mark the trial ours" makes the pair atomic:

- journal file and SQLite storages: a ``filelock.FileLock`` next to the storage file (every worker of
  these storages is on the machine, or the network file system, that holds the file);
- PostgreSQL: a transaction-level advisory lock (``pg_advisory_xact_lock``) keyed on the study name,
  taken on the storage's own engine. The server releases it when the transaction ends, and also when
  the worker dies mid-ask, because its connection goes with it;
- anything else (MySQL, an in-memory SQLite): no cross-process lock; a warning says that workers in
  several processes may overshoot ``n_trials`` by a trial or two. Threads of one process are still kept
  apart by the runner's own thread lock.

``closes_the_sweep`` picks, among workers that end, the one that writes the report and closes the
MLflow parent run: the last one out, exactly one of those that end together.

``schema_lock`` serialises opening a PostgreSQL storage: Optuna creates its tables on first use, and
workers starting together on an empty database would otherwise race to create them (and fail with
``duplicate key value violates unique constraint "pg_type_typname_nsp_index"``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from lora_sweep.sweep.optuna_api import database_engine, storage_of
from lora_sweep.sweep.study import JOURNAL_PREFIX

log = logging.getLogger(__name__)
_warned: set[str] = set()


def advisory_key(study_name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks (Python's hash() changes per process)."""
    return int.from_bytes(
        hashlib.blake2b(f"lora_sweep:{study_name}".encode(), digest_size=8).digest(), "big", signed=True
    )


def lock_file(spec: str, study_name: str) -> Path | None:
    """The lock file of a file-backed storage (journal or SQLite), or None for a server."""
    if spec.startswith(JOURNAL_PREFIX):
        target = Path(spec[len(JOURNAL_PREFIX) :])
    elif spec.startswith("sqlite"):
        database = make_url(spec).database
        if not database or database == ":memory:":
            return None
        target = Path(database).expanduser().resolve()
    else:
        return None
    # Optuna's journal uses "<file>.lock" for its own writes: ours must not be that file
    suffix = hashlib.blake2b(study_name.encode(), digest_size=6).hexdigest()
    return target.with_name(f"{target.name}.study-{suffix}.lock")


@contextlib.contextmanager
def study_lock(storage, spec: str, study_name: str) -> Iterator[bool]:
    """Hold the study-wide lock of ``study_name`` in ``storage`` (an Optuna storage opened from ``spec``).
    Yields whether it excludes every other process (False: a storage without a cross-process lock)."""
    path = lock_file(spec, study_name)
    if path is not None:
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path)):
            yield True
        return
    engine = database_engine(storage)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with engine.begin() as connection:  # the lock lasts until this transaction commits
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(study_name)})
            yield True
        return
    if spec not in _warned:
        _warned.add(spec)
        log.warning(
            "hydra.sweeper.storage: no lock across processes for this storage; workers in several processes "
            "may "
            "overshoot n_trials by a trial or two (journal, sqlite and postgresql storages are exact)"
        )
    yield False


@contextlib.contextmanager
def schema_lock(url: str, connect_timeout: int) -> Iterator[None]:
    """Hold a database-wide advisory lock while the caller opens (and maybe creates) an RDB storage."""
    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": connect_timeout})
    try:
        with engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key("optuna schema")}
            )
            yield
    finally:
        engine.dispose()


def closes_the_sweep(studies: list, spec: str, me: dict) -> bool:
    """Whether this worker (``me``: its sweeper identity) is the last one out of the sweep's ``studies``
    (the main study last), so it writes the report and closes the parent run, once, not once per worker."""
    main = studies[-1]
    with study_lock(storage_of(main), spec, f"{main.study_name}/finish"):
        trials = [t for study in studies for t in study.get_trials(deepcopy=False)]
        if any(t.state == TrialState.RUNNING for t in trials):
            return False  # another worker is still training: it closes the sweep when it is done
        if not any(t.user_attrs.get("sweeper") == me for t in trials):
            return True  # this process ran nothing (a rerun of a finished sweep): it closes the sweep again
        ended = sum(t.state.is_finished() for t in trials)
        if main.user_attrs.get("lora_sweep_closed_at") == ended:
            return False  # a worker that ended at the same moment got here first
        main.set_user_attr("lora_sweep_closed_at", ended)
        return True
