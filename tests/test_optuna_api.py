"""The adapter to Optuna's non-public API (:mod:`lora_sweep.sweep.optuna_api`), pinned against real
storages, and a check that no other module of ours reaches into Optuna's or Hydra's private API."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lora_sweep.sweep import optuna_api


@pytest.fixture
def journal(tmp_path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))


@pytest.fixture
def rdb(tmp_path) -> RDBStorage:
    # one second of grace: sqlite's clock has whole seconds, so a heartbeat two seconds old is stale
    return RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1)


@pytest.fixture(params=["journal", "rdb"])
def storage(request):
    return request.getfixturevalue(request.param)


def _study(storage, name: str = "s") -> optuna.Study:
    return optuna.create_study(
        study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
    )


def test_storage_of_a_study_is_the_one_it_was_opened_on(journal, rdb):
    assert optuna_api.storage_of(_study(journal)) is journal
    assert optuna_api.storage_of(optuna.load_study(study_name="s", storage=journal)) is journal
    held = optuna_api.storage_of(_study(rdb))  # create_study wraps an RDBStorage in its cache: same data
    assert isinstance(held, optuna.storages.BaseStorage)
    study = optuna.load_study(study_name="s", storage=rdb)
    trial = study.ask()
    trial.set_user_attr("k", 1)
    trial_id = optuna_api.trial_id(study, trial.number)
    assert held.get_trial(trial_id).user_attrs == rdb.get_trial(trial_id).user_attrs == {"k": 1}


def test_trial_id_is_the_storage_id_that_trial_takes(storage):
    first, second = _study(storage, "first"), _study(storage, "second")
    for _ in range(3):
        first.ask()
    asked = [second.ask() for _ in range(2)]
    asked[1].suggest_int("x", 0, 9)
    for trial in asked:
        trial_id = optuna_api.trial_id(second, trial.number)
        frozen = optuna_api.storage_of(second).get_trial(trial_id)
        assert frozen.number == trial.number and frozen.params == trial.params
        assert optuna.trial.Trial(second, trial_id).number == trial.number
    assert optuna_api.trial_id(second, 0) != 0  # ids run across studies, numbers per study
    with pytest.raises(KeyError):
        optuna_api.trial_id(second, 5)


def test_heartbeat_enabled_only_on_an_rdb_storage_with_an_interval(journal, rdb, tmp_path):
    assert not optuna_api.heartbeat_enabled(journal)
    assert optuna_api.heartbeat_enabled(rdb)
    assert optuna_api.heartbeat_enabled(optuna_api.storage_of(_study(rdb)))
    assert not optuna_api.heartbeat_enabled(RDBStorage(f"sqlite:///{tmp_path / 'plain.db'}"))


def test_a_trial_whose_heartbeat_stopped_is_stale(rdb):
    study = _study(rdb)
    beating, silent, never = study.ask(), study.ask(), study.ask()
    ids = {t.number: optuna_api.trial_id(study, t.number) for t in (beating, silent, never)}
    rdb.record_heartbeat(ids[silent.number])
    with optuna_api.heartbeat(optuna_api.storage_of(study), ids[beating.number]):
        time.sleep(2.5)
        assert optuna_api.stale_trial_ids(study) == [ids[silent.number]]  # no heartbeat yet: not stale
    time.sleep(2.5)
    assert sorted(optuna_api.stale_trial_ids(study)) == sorted([ids[beating.number], ids[silent.number]])
    study.tell(silent, state=TrialState.FAIL)
    assert optuna_api.stale_trial_ids(study) == [ids[beating.number]]  # only RUNNING trials are stale


def test_without_heartbeat_nothing_is_stale_and_the_heartbeat_is_a_no_op(journal):
    study = _study(journal)
    trial = study.ask()
    with optuna_api.heartbeat(journal, optuna_api.trial_id(study, trial.number)):
        pass
    assert optuna_api.stale_trial_ids(study) == []


def test_database_engine_of_an_rdb_storage_as_opened_or_as_a_study_holds_it(journal, rdb):
    engine = optuna_api.database_engine(rdb)
    assert engine is not None and engine.dialect.name == "sqlite"
    assert optuna_api.database_engine(optuna_api.storage_of(_study(rdb))) is engine
    assert optuna_api.database_engine(journal) is None


# ---- no private Optuna/Hydra API outside the adapter --------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("lora_sweep", "hydra_plugins")
ADAPTER = ROOT / "lora_sweep" / "sweep" / "optuna_api.py"
FOREIGN = ("optuna", "hydra")
# private names of Optuna and Hydra we used, flagged even if a module of ours defines the same name
KNOWN = {
    "_storage",
    "_study_id",
    "_trial_id",
    "_return_value",
    "_contains",
    "_get_stale_trial_ids",
    "_backend",
    "_cached_frozen_trial",
    "_heartbeat",
}
# other libraries' private names we accept, with the reason
ALLOWED = {
    "_instances": "tqdm: the bars a failure left open, to close them before the error line; no public list"
}


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_private_names(trees: dict[Path, ast.AST]) -> set[str]:
    """Private names our own code defines: methods, functions, classes, class attributes and attributes
    assigned anywhere (``self._lock = ...``). Accessing those is our business, not a library's."""
    names: set[str] = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    targets = (
                        item.targets if isinstance(item, ast.Assign) else [getattr(item, "target", None)]
                    )
                    names.update(t.id for t in targets if isinstance(t, ast.Name))
    return {name for name in names if _private(name)} - KNOWN


def _private_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] in FOREIGN and any(_private(part) for part in parts[1:])


def private_api_uses(files: list[Path]) -> list[str]:
    """Every use of a library's private API in ``files``: ``x._name`` where our code defines no ``_name``,
    ``getattr(x, "_name")``, and imports from private modules (``optuna.storages._heartbeat``)."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in _sources()}
    own = _own_private_names(trees) | set(ALLOWED)
    found = []
    for path in files:
        for node in ast.walk(trees[path] if path in trees else ast.parse(path.read_text(), str(path))):
            shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
            where = f"{shown}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{where}: .{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and _private(node.args[1].value)
                and node.args[1].value not in own
            ):
                found.append(f"{where}: {node.func.id}(..., {node.args[1].value!r})")
            elif isinstance(node, ast.ImportFrom) and node.module and _private_module(node.module):
                found.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FOREIGN:
                found += [
                    f"{where}: from {node.module} import {a.name}" for a in node.names if _private(a.name)
                ]
            elif isinstance(node, ast.Import):
                found += [f"{where}: import {a.name}" for a in node.names if _private_module(a.name)]
    return found


def test_no_private_optuna_or_hydra_api_outside_the_adapter():
    uses = private_api_uses([p for p in _sources() if p != ADAPTER])
    assert not uses, "private Optuna/Hydra API outside lora_sweep/sweep/optuna_api.py:\n" + "\n".join(uses)


def test_the_private_api_check_catches_each_kind(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from optuna.storages._heartbeat import is_heartbeat_enabled\nimport optuna.storages._heartbeat\n"
        "def f(study, result, dist):\n    return study._storage, result._return_value, dist._contains(1), "
        "getattr(study, '_study_id'), study.__class__\n"
    )
    found = "\n".join(private_api_uses([sample]))
    for expected in (
        "from optuna.storages._heartbeat",
        "import optuna.storages._heartbeat",
        "._storage",
        "._return_value",
        "._contains",
        "'_study_id'",
    ):
        assert expected in found
    assert "__class__" not in found
