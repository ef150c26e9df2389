"""Layers only call down: every import of every module (top-level and function-local, relative ones too) is
read with ``ast`` and checked against the map below. Also: only ``lora_sweep/tracking.py`` imports mlflow."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Higher number = higher layer. A module may import its own layer (subject to ORCHESTRATION_ORDER) or lower.
ENTRY, ORCHESTRATION, BUILDING_BLOCK, FOUNDATION = 4, 3, 2, 1
LAYER_NAMES = {
    ENTRY: "entry point",
    ORCHESTRATION: "orchestration",
    BUILDING_BLOCK: "building block",
    FOUNDATION: "foundation",
}

# Most specific prefix wins: ``lora_sweep.sweep.study`` is a building block although ``lora_sweep.sweep`` is
# not.
LAYERS: dict[str, int] = {
    # entry points: what a user or Hydra starts
    "lora_sweep.__main__": ENTRY,
    "lora_sweep.cli": ENTRY,
    "lora_sweep.hydra_api": ENTRY,  # the command line's composition check, for __main__
    "lora_sweep.report.__main__": ENTRY,
    "hydra_plugins": ENTRY,
    # orchestration: a run, a sweep, a report
    "lora_sweep.run": ORCHESTRATION,
    "lora_sweep.sweep": ORCHESTRATION,
    "lora_sweep.sweep.ladder": ORCHESTRATION,  # the budget ladder's rungs: phases of the sweep's runner
    "lora_sweep.report": ORCHESTRATION,
    # building blocks
    **{
        f"lora_sweep.{name}": BUILDING_BLOCK
        for name in (
            "data",
            "lm_data",
            "models",
            "targets",
            "train",
            "checkpoint",
            "tracking",
            "evaluation",
            "lm_eval",
            "tasks",
            "gguf",
            "hub",
            "offline",
            "oom",
            "reuse",
            "weights",
            "system",
            "prepare",
            "methods",
            "sweep.study",
            "sweep.space",
            "sweep.locks",
            "sweep.trials",
            "sweep.optuna_api",
            "sweep.devices",
            "sweep.lr_range",
        )
    },
    # foundations
    **{
        f"lora_sweep.{name}": FOUNDATION
        for name in ("config", "schema", "errors", "record", "secrets", "ranking", "sweep.settings")
    },
    "lora_sweep": FOUNDATION,  # the package's __init__: environment defaults only
}

# The strict order inside orchestration (higher may import lower, never the reverse):
#   the sweep's runner side (runner, results, summary, retention, trial) may call the report's builder to
#   write the report when the sweep ends; the report must not import the sweep's runner side; nothing in
#   orchestration imports ``lora_sweep.run``: only the Hydra task (cli) does.
ORCHESTRATION_ORDER = {"lora_sweep.sweep": 3, "lora_sweep.report": 2, "lora_sweep.run": 1}
ONLY_ENTRY_POINTS_IMPORT = ("lora_sweep.run",)
# What the sweep may take from the report: its builder (``lora_sweep.report``), nothing inside it; what both
# need (the trials table, the pick rule) lives a layer down, in ``lora_sweep.sweep.trials``.
SWEEP_MAY_IMPORT_FROM_REPORT = ("lora_sweep.report",)
# A report on a finished sweep is pure reading: no module of the report may import the training code.
TRAINING = ("lora_sweep.train", "lora_sweep.run")


def _lookup(table: dict[str, int], module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in table:
            return prefix, table[prefix]
    return None


def layer_of(module: str) -> int | None:
    found = _lookup(LAYERS, module)
    return None if found is None else found[1]


def modules() -> dict[str, Path]:
    found = {}
    for package in ("lora_sweep", "hydra_plugins"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, at any depth, relative ones resolved."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from lora_sweep import run`` / ``from . import x`` import submodules: check those too
            found += [
                (node.lineno, f"{target}.{alias.name}")
                for alias in node.names
                if f"{target}.{alias.name}" in MODULES
            ]
    return found


MODULES = modules()


def violations() -> list[str]:
    problems = []
    for module, path in MODULES.items():
        mine = layer_of(module)
        assert mine is not None, f"{module} has no layer: add it to LAYERS in tests/test_layers.py"
        where = path.relative_to(ROOT)
        for line, target in imports(module, path):
            if not (target == "lora_sweep" or target.startswith(("lora_sweep.", "hydra_plugins"))):
                continue
            theirs = layer_of(target)
            if theirs is None:
                problems.append(f"{where}:{line}: imports {target}, which has no layer")
                continue
            if theirs > mine:
                problems.append(
                    f"{where}:{line}: {module} ({LAYER_NAMES[mine]}) imports {target} "
                    f"({LAYER_NAMES[theirs]}), a higher layer"
                )
            elif theirs == mine == ORCHESTRATION:
                a, b = _lookup(ORCHESTRATION_ORDER, module), _lookup(ORCHESTRATION_ORDER, target)
                if a and b and a[0] != b[0] and b[1] > a[1]:
                    problems.append(
                        f"{where}:{line}: {module} imports {target}: within orchestration "
                        f"{a[0]} must not call up into {b[0]}"
                    )
                if (
                    a
                    and b
                    and a[0] == "lora_sweep.sweep"
                    and b[0] == "lora_sweep.report"
                    and target not in SWEEP_MAY_IMPORT_FROM_REPORT
                ):
                    problems.append(
                        f"{where}:{line}: {module} imports {target}: the sweep calls only the report's "
                        "builder (lora_sweep.report); move what both need down a layer"
                    )
            if (
                any(target == t or target.startswith(t + ".") for t in ONLY_ENTRY_POINTS_IMPORT)
                and mine != ENTRY
            ):
                problems.append(
                    f"{where}:{line}: {module} imports {target}: only entry points (the Hydra task) may"
                )
            if module.startswith("lora_sweep.report") and any(
                target == t or target.startswith(t + ".") for t in TRAINING
            ):
                problems.append(f"{where}:{line}: {module} imports {target}: the report never trains")
    return problems


def test_every_import_goes_down_a_layer():
    problems = violations()
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_the_map_knows_the_modules_other_helpers_add():
    assert layer_of("lora_sweep.sweep.optuna_api") == BUILDING_BLOCK
    assert layer_of("lora_sweep.tasks.causal") == BUILDING_BLOCK  # tasks/ as a package
    assert layer_of("lora_sweep.methods") == BUILDING_BLOCK
    assert (
        layer_of("lora_sweep.sweep.runner") == ORCHESTRATION
        and layer_of("lora_sweep.report.__main__") == ENTRY
    )


def test_the_checker_catches_an_upward_import(tmp_path):
    """The checker itself can fail: a building block importing the sweep's runner, locally, relatively."""
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from .sweep import runner\n    from lora_sweep.cli import main\n")
    found = imports("lora_sweep.data", fake)
    assert (2, "lora_sweep.sweep.runner") in found and (3, "lora_sweep.cli") in found
    assert all(layer_of(t) > BUILDING_BLOCK for _, t in found if t != "lora_sweep.sweep")


def test_only_tracking_imports_mlflow():
    hits = [
        f"{path.relative_to(ROOT)}:{line}: {module} imports {target}; go through lora_sweep.tracking"
        for module, path in MODULES.items()
        if module != "lora_sweep.tracking"
        for line, target in imports(module, path)
        if target == "mlflow" or target.startswith("mlflow.")
    ]
    assert not hits, "\n".join(hits)
