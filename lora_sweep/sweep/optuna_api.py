"""The few things the sweeper needs from Optuna that its public API does not offer, in one place.

Everything else goes through Optuna's public API. Each function here reaches past it, says why, and is
pinned by ``tests/test_optuna_api.py`` against real journal and RDB storages, so an Optuna upgrade that
changes one of these fails there, in one place, rather than somewhere in a sweep.

- :func:`storage_of`: ``Study`` has no public accessor for its storage (``study._storage``). The sweeper
  needs it for the study lock and to requeue a trial (a RUNNING -> WAITING state change, which
  ``Study`` cannot make).
- :func:`heartbeat_enabled` and :func:`heartbeat`: Optuna's heartbeat helpers live in the private
  ``optuna.storages._heartbeat`` (only ``optimize()`` uses them); we run trials ourselves, so we start the
  heartbeat thread ourselves.
- :func:`stale_trial_ids`: which RUNNING trials' heartbeat stopped is only ``_get_stale_trial_ids`` of
  the storage; the public ``fail_stale_trials`` fails them, and we want to requeue them instead.
- :func:`database_engine`: ``create_study`` wraps an ``RDBStorage`` in a private cache
  (``_CachedStorage._backend``); the study lock takes a PostgreSQL advisory lock on the storage's own engine.

Trial ids need no private API: :func:`trial_id` asks the storage by study name and trial number.
"""

from __future__ import annotations

import contextlib
from typing import Any

import optuna
from optuna.storages import BaseStorage


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes: the object given to ``create_study``/``load_study``, or for
    an ``RDBStorage`` Optuna's caching wrapper around it (same data, same heartbeat)."""
    return study._storage


def trial_id(study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` of ``study`` (what ``optuna.trial.Trial(study, id)`` takes)."""
    storage = storage_of(study)
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )


def heartbeat_enabled(storage: BaseStorage) -> bool:
    """Whether ``storage`` keeps heartbeats (an RDB storage opened with a ``heartbeat_interval``)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def heartbeat(storage: BaseStorage, trial: int) -> contextlib.AbstractContextManager[Any]:
    """A context that records trial ``trial``'s (an id) heartbeat every interval while it lasts; a no-op
    context for storages without heartbeat."""
    if not heartbeat_enabled(storage):
        return contextlib.nullcontext()
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial, storage)


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Ids of ``study``'s RUNNING trials whose heartbeat is older than the storage's grace period; none
    for storages without heartbeat."""
    storage = storage_of(study)
    if not heartbeat_enabled(storage):
        return []
    return list(storage._get_stale_trial_ids(storage.get_study_id_from_name(study.study_name)))


def database_engine(storage: BaseStorage) -> Any | None:
    """The SQLAlchemy engine behind an RDB storage (given as opened or as a study holds it), else None."""
    backend = getattr(storage, "_backend", storage)  # create_study's cache around an RDBStorage
    return backend.engine if isinstance(backend, optuna.storages.RDBStorage) else None
