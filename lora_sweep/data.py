"""Text classification data: load (builtin, local file or hub), split, encode labels, tokenize, cache.

The tokenized splits are cached under ``data.cache_dir`` keyed by everything that shapes them (the
source files, columns, split spec, tokenizer, max length), so a second run, or every later trial of a
sweep, skips loading, splitting and tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lora_sweep.config import DataConfig
from lora_sweep.errors import ConfigError
from lora_sweep.hub import require_hub_dataset
from lora_sweep.offline import builtin_dataset

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when the prepared format changes (2: truncation counts in the meta file)
LENGTH_COLUMN = "_tokens"  # each row's token count before truncation, counted then dropped before caching
PACKED_TOKENS = "packed_tokens"  # a packed batch's real token count: the loop pops it before the forward
CUT_WARNING_SHARE = 0.10  # a larger share of training rows cut (or dropped) at train.max_length warns
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


@dataclass
class TaskData:
    splits: datasets.DatasetDict  # noqa: F821  train/validation/test: input_ids, attention_mask, labels
    label_names: list[str]
    cache_path: Path
    from_cache: bool
    prompts: list = field(default_factory=list)  # causal LMs: the first test prompts, for generations
    # what train.max_length did to the rows: {"max_length", "truncated": {split: counts}, "dropped": {...}}
    lengths: dict = field(default_factory=dict)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def source_files(cfg: DataConfig) -> list[Path]:
    """The local files behind the data (empty for a hub dataset)."""
    if cfg.source == "builtin":
        return [builtin_dataset(cfg.path, cfg.cache_dir)]
    if cfg.source == "hub":
        return []
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("data.path", cfg.path, "no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIX_FORMATS) if path.is_dir() else [path]
    if not files:
        raise ConfigError("data.path", cfg.path, f"holds no data file ({', '.join(SUFFIX_FORMATS)})")
    return files


def _split_of(file: Path) -> str | None:
    stem = file.stem.lower()
    for alias, split in SPLIT_NAMES.items():
        if stem == alias or stem.startswith((alias + "-", alias + "_", alias + ".")):
            return split
    return None


def load_raw(cfg: DataConfig, files: list[Path]):
    """The data as a DatasetDict whose splits are named train/validation/test where they exist."""
    import datasets

    if cfg.source == "hub":
        if not Path(cfg.path).expanduser().exists():  # a local dataset folder loads the same way, offline
            require_hub_dataset(cfg.path)
        raw = datasets.load_dataset(
            str(Path(cfg.path).expanduser()) if Path(cfg.path).expanduser().exists() else cfg.path,
            cfg.hub_config,
        )
        return datasets.DatasetDict({SPLIT_NAMES.get(name, name): split for name, split in raw.items()})

    if Path(cfg.path).expanduser().is_dir():
        by_split: dict[str, list[Path]] = {}
        for file in files:
            split = _split_of(file)
            if split is None:
                raise ConfigError(
                    "data.path",
                    cfg.path,
                    f"cannot tell the split of {file.name}: name files train.*, validation.* (or dev.*), "
                    "test.*",
                )
            by_split.setdefault(split, []).append(file)
    else:
        by_split = {"train": files}
    fmt = cfg.format if cfg.format != "auto" else SUFFIX_FORMATS.get(files[0].suffix)
    if fmt is None:
        raise ConfigError(
            "data.format", cfg.format, f"cannot tell the format of {files[0].name}; set data.format"
        )
    builder = {"tsv": "csv", "jsonl": "json"}.get(fmt, fmt)
    extra = {"delimiter": "\t"} if fmt == "tsv" else {}
    root = Path(cfg.path).expanduser()
    raw = {}
    for split, split_files in by_split.items():
        for file in split_files:
            if file.stat().st_size == 0:
                raise ConfigError("data.path", cfg.path, f"{_shown(file, root)} is empty (0 bytes)")
            problem = utf8_problem(file) if fmt != "parquet" else None
            if problem:
                raise ConfigError("data.path", cfg.path, f"{_shown(file, root)} {problem}")
        try:
            raw[split] = datasets.load_dataset(
                builder, data_files={split: [str(f) for f in split_files]}, split=split, **extra
            )
        except ValueError as err:
            if "corresponds to no data" in str(err):
                raise ConfigError(
                    "data.path", cfg.path, f"the {split} split is empty ({split_files[0].name} has no rows)"
                ) from err
            raise _unreadable(cfg, fmt, split_files, root, err) from err
        except Exception as err:  # a file datasets cannot parse: name it, do not dump a traceback
            raise _unreadable(cfg, fmt, split_files, root, err) from err
    return datasets.DatasetDict(raw)


def _shown(file: Path, root: Path) -> str:
    """A data file as the user knows it: its name, or its path inside data.path when that is a folder."""
    return str(file.relative_to(root)) if root.is_dir() and file.is_relative_to(root) else file.name


def _unreadable(cfg: DataConfig, fmt: str, files: list[Path], root: Path, err: Exception) -> ConfigError:
    """Why datasets could not read ``files``, found by reading them again ourselves (only once datasets has
    failed: nothing is read twice on the way that works): datasets' own message is a generic "An error
    occurred while generating the dataset" whose cause is buried in a traceback."""
    for file in files:
        problem = file_problem(file, fmt)
        if problem:
            return ConfigError("data.path", cfg.path, f"{_shown(file, root)} {problem}")
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ConfigError("data.path", cfg.path, f"could not be read as {fmt}: {text}")


def file_problem(file: Path, fmt: str) -> str | None:
    """What makes a text data file unreadable: bytes that are not UTF-8 (offset and line), a JSON line or
    document that does not parse (line and column); None when we see nothing wrong."""
    if fmt == "parquet":
        return None
    problem = utf8_problem(file)
    if problem or fmt not in ("json", "jsonl"):
        return problem
    text = file.read_text(encoding="utf-8")
    if not text.strip():
        return f"is empty ({len(text)} characters of whitespace)"
    if text.lstrip().startswith("["):  # one JSON document: a list of rows
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == 1:  # maybe no JSON lines at all but one pretty-printed document
                try:
                    json.loads(text)
                except json.JSONDecodeError as whole:
                    return f"is not valid JSON (line {whole.lineno}, column {whole.colno}: {whole.msg})"
                return None
            return f"line {number} is not valid JSON ({err.msg} at column {err.colno})"
        if not isinstance(row, dict):
            return f"line {number} is a JSON {type(row).__name__}, not an object of column values"
    return None


def utf8_problem(file: Path, chunk_size: int = 1 << 20) -> str | None:
    """Where ``file`` stops being UTF-8 (byte, offset, line), reading it in chunks; None if it is UTF-8.
    Checked before datasets reads a file: its JSON reader takes bad bytes in silently, and they fail later,
    as a traceback, when the rows are tokenized."""
    offset, lines, pending = 0, 1, b""
    with file.open("rb") as handle:
        while True:
            chunk = handle.read(chunk_size)
            data = pending + chunk
            try:
                data.decode("utf-8")
                valid = len(data)
            except UnicodeDecodeError as err:
                # a character split across two chunks is no error: decode it with the next chunk
                if chunk and err.reason == "unexpected end of data":
                    valid = err.start
                else:
                    where = offset + err.start
                    line = lines + data.count(b"\n", 0, err.start)
                    return (
                        f"is not UTF-8 (byte 0x{data[err.start]:02x} at offset {where:,}, line {line}); "
                        "save it as UTF-8"
                    )
            lines += data.count(b"\n", 0, valid)
            offset += valid
            pending = data[valid:]
            if not chunk:
                return None


def check_not_all_empty(raw, columns: list[tuple[str, str | None]]) -> None:
    """A column that is empty in every row of a split is named itself: otherwise dropping its empty rows
    leaves nothing, and the error blames whichever column is checked next."""
    for split_name, split in raw.items():
        if len(split) == 0:
            continue
        for key, column in columns:
            if column is None or column not in split.column_names:
                continue
            if all(v is None or (isinstance(v, str) and not v.strip()) for v in split[column]):
                raise ConfigError(
                    key, column, f"empty in every row of the {split_name} split ({len(split)} rows)"
                )


def length_counts(splits, max_length: int, dropped: dict | None = None, truncating: bool = True) -> dict:
    """What train.max_length did to each split, from each row's untruncated token count
    (``LENGTH_COLUMN``): rows truncated, their share, the median length; rows dropped for length."""
    truncated = {}
    for name, split in splits.items():
        tokens = split[LENGTH_COLUMN] if truncating else []
        cut = sum(n > max_length for n in tokens)
        truncated[name] = {
            "rows": cut,
            "of": len(split),
            "share": cut / len(split) if len(split) else 0.0,
            **({"median_tokens": statistics.median(tokens)} if tokens else {}),
        }
    return {"max_length": max_length, "truncated": truncated, "dropped": dropped or {}}


def warn_if_cut(lengths: dict) -> None:
    """One warning when train.max_length cuts (or drops) a large share of the training rows."""
    max_length = lengths.get("max_length")
    train = lengths.get("truncated", {}).get("train")
    if train and train["share"] > CUT_WARNING_SHARE:
        log.warning(
            "train.max_length=%s cuts %.0f%% of the train rows (median %g tokens); raise train.max_length",
            max_length,
            100 * train["share"],
            train.get("median_tokens", 0),
        )
    for name, dropped in lengths.get("dropped", {}).items():
        if dropped["share"] > CUT_WARNING_SHARE:
            where = "rows" if name == "all" else f"{name} rows"
            log.warning(
                "train.max_length=%s leaves %.0f%% of the %s (%d of %d) nothing to learn from: dropped; "
                "raise train.max_length",
                max_length,
                100 * dropped["share"],
                where,
                dropped["rows"],
                dropped["of"],
            )


def _check_columns(cfg: DataConfig, raw) -> None:
    for split_name, split in raw.items():
        for key in ("text_column", "text_pair_column", "label_column"):
            column = getattr(cfg, key)
            if column is not None and column not in split.column_names:
                raise ConfigError(
                    f"data.{key}",
                    column,
                    f"no such column in the {split_name} split (columns: {', '.join(split.column_names)})",
                )


def _label_names(raw, column: str) -> list[str]:
    values = set()
    for split in raw.values():
        values.update(v for v in split[column] if v is not None)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _check_labels_seen_in_train(cfg: DataConfig, raw) -> None:
    """A class that only validation or test has is one the model is scored on but never taught."""
    if "train" not in raw:
        return
    taught = {str(v) for v in raw["train"][cfg.label_column]}
    for name, split in raw.items():
        unseen = sorted({str(v) for v in split[cfg.label_column]} - taught)
        if unseen:
            raise ConfigError(
                "data.label_column",
                cfg.label_column,
                f"the {name} split has label(s) {', '.join(unseen[:5])} that the "
                f"train split never has (train labels: {', '.join(sorted(taught)[:10])})",
            )


def _split(cfg: DataConfig, raw):
    """train/validation/test, cutting whatever is missing out of train (seeded, stratified by label)."""
    import datasets

    if "train" not in raw:
        raise ConfigError("data.path", cfg.path, f"has no train split (splits: {', '.join(raw)})")
    split = cfg.split
    stratify = "labels" if split.stratify else None
    splits = dict(raw)
    try:
        if "test" not in splits:
            cut = splits["train"].train_test_split(
                test_size=split.test, seed=split.seed, stratify_by_column=stratify
            )
            splits["train"], splits["test"] = cut["train"], cut["test"]
        if "validation" not in splits:
            rows = round(split.validation * len(raw["train"]))  # a share of all the data, not of what is left
            cut = splits["train"].train_test_split(
                test_size=max(rows, 1), seed=split.seed, stratify_by_column=stratify
            )
            splits["train"], splits["validation"] = cut["train"], cut["test"]
    except ValueError as err:  # too few rows of some class to stratify, or a split that rounds to zero
        raise ConfigError(
            "data.split",
            f"validation={split.validation}, test={split.test}",
            f"cannot cut the splits from {len(raw['train'])} rows: {err}",
        ) from err
    result = datasets.DatasetDict({name: splits[name] for name in ("train", "validation", "test")})
    for name, limit in (
        ("train", cfg.max_train_samples),
        ("validation", cfg.max_eval_samples),
        ("test", cfg.max_eval_samples),
    ):
        if limit is not None and len(result[name]) > limit:
            result[name] = result[name].shuffle(seed=split.seed).select(range(limit))
    for name, part in result.items():
        if len(part) == 0:
            raise ConfigError("data.path", cfg.path, f"the {name} split is empty")
    return result


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # without the truncation/padding state that each tokenizer call leaves behind
        text = json.dumps(
            {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")},
            sort_keys=True,
        )
    else:
        text = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{text}".encode()).hexdigest()[:16]


def cache_key(cfg: DataConfig, files: list[Path], tokenizer, max_length: int) -> str:
    identity = {
        "version": CACHE_VERSION,
        "source": cfg.source,
        "path": cfg.path,
        "hub_config": cfg.hub_config,
        "files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "columns": [cfg.text_column, cfg.text_pair_column, cfg.label_column],
        "split": [cfg.split.validation, cfg.split.test, cfg.split.seed, cfg.split.stratify],
        "limits": [cfg.max_train_samples, cfg.max_eval_samples],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def prepare_data(cfg: DataConfig, tokenizer, max_length: int, num_labels: int | None = None) -> TaskData:
    import datasets

    datasets.disable_progress_bars()  # one-off preprocessing of small data; our own bars show training

    files = source_files(cfg)
    cache_path = (
        Path(cfg.cache_dir).expanduser()
        / "tokenized"
        / f"{cfg.name}-{cache_key(cfg, files, tokenizer, max_length)}"
    )
    meta_file = cache_path / "lora_sweep_data.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        warn_if_cut(meta["lengths"])
        return TaskData(
            datasets.load_from_disk(str(cache_path / "splits")),
            meta["label_names"],
            cache_path,
            True,
            lengths=meta["lengths"],
        )

    raw = load_raw(cfg, files)
    _check_columns(cfg, raw)
    check_not_all_empty(
        raw,
        [
            ("data.text_column", cfg.text_column),
            ("data.text_pair_column", cfg.text_pair_column),
            ("data.label_column", cfg.label_column),
        ],
    )
    raw = datasets.DatasetDict(
        {
            n: s.filter(lambda row: row[cfg.label_column] is not None and row[cfg.text_column] is not None)
            for n, s in raw.items()
        }
    )
    label_names = _label_names(raw, cfg.label_column)
    if len(label_names) < 2:
        raise ConfigError(
            "data.label_column",
            cfg.label_column,
            f"holds {len(label_names)} distinct label(s); a classifier needs at least 2",
        )
    if num_labels is not None and len(label_names) > num_labels:
        raise ConfigError(
            "data.label_column",
            cfg.label_column,
            f"holds {len(label_names)} labels ({', '.join(label_names[:10])}) but "
            f"model.num_labels={num_labels}",
        )
    _check_labels_seen_in_train(cfg, raw)
    index = {name: i for i, name in enumerate(label_names)}
    class_label = datasets.ClassLabel(names=label_names)

    def encode(batch):
        texts = [str(t) for t in batch[cfg.text_column]]
        pairs = [str(t) for t in batch[cfg.text_pair_column]] if cfg.text_pair_column else None
        # untruncated first, to count (verbose=False: no "longer than the maximum" notice per long row);
        # then only the rows that are too long are encoded again, cut as the tokenizer cuts them
        encoded = tokenizer(texts, pairs, truncation=False, verbose=False)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        long = [i for i, n in enumerate(lengths) if n > max_length]
        if long:
            cut = tokenizer(
                [texts[i] for i in long],
                [pairs[i] for i in long] if pairs else None,
                truncation=True,
                max_length=max_length,
            )
            for key in encoded:
                for j, i in enumerate(long):
                    encoded[key][i] = cut[key][j]
        encoded["labels"] = [index[str(v)] for v in batch[cfg.label_column]]
        encoded[LENGTH_COLUMN] = lengths
        return encoded

    encoded = datasets.DatasetDict(
        {
            name: split.map(
                encode, batched=True, remove_columns=split.column_names, desc=f"tokenizing {name}"
            ).cast_column("labels", class_label)
            for name, split in raw.items()
        }
    )
    splits = _split(cfg, encoded)
    lengths = length_counts(splits, max_length)
    warn_if_cut(lengths)
    splits = splits.remove_columns(LENGTH_COLUMN)
    return TaskData(
        save_to_cache(splits, cache_path, {"label_names": label_names, "lengths": lengths}),
        label_names,
        cache_path,
        False,
        lengths=lengths,
    )


def save_to_cache(splits, cache_path: Path, meta: dict):
    """Write tokenized splits (and what else their loader needs, ``meta``) into the cache, atomically;
    return them as loaded back from there (memory-mapped)."""
    import datasets

    tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp / "splits"))
    (tmp / "lora_sweep_data.json").write_text(
        json.dumps({**meta, "sizes": {n: len(s) for n, s in splits.items()}})
    )
    try:
        os.replace(tmp, cache_path)  # atomic: a concurrent worker may have won the race, which is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(cache_path / "splits"))


def row_lengths(dataset) -> list[int]:
    """Each row's token count (its ``input_ids``), read from the column without decoding the other fields."""
    column = dataset["input_ids"] if hasattr(dataset, "column_names") else [r["input_ids"] for r in dataset]
    return [len(ids) for ids in column]


def make_loader(
    dataset,
    collator,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    pin_memory: bool = False,
    num_workers: int = 0,
    skip_batches: int = 0,
    sort_by_length: bool = False,
    group_by_length: bool = False,
):
    """Batches in a deterministic order: epoch ``e`` of seed ``s`` always shuffles the same way.

    The loader draws nothing from the global RNG (DataLoader would, for its worker seed, unless given a
    generator), so the dropout masks of a run do not depend on when its loaders were made: what an exact
    resume needs. ``skip_batches`` starts the epoch that many batches in (a resumed run's data position).

    ``sort_by_length`` (evaluation): rows longest first, so each batch pads to a length close to its rows'
    own; ``loader.sampler`` is the order, for putting per-row outputs back in the dataset's order.
    ``group_by_length`` (training, with ``shuffle``): transformers' length-grouped order (megabatches of 50
    batches, each sorted by length), drawn from the same seeded generator, so a resume is as exact.
    """
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    epoch_seed = seed * 100_003 + epoch
    if shuffle and group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(
            batch_size, lengths=row_lengths(dataset), generator=torch.Generator().manual_seed(epoch_seed)
        )
        order = list(sampler)
    elif shuffle:
        order = list(RandomSampler(dataset, generator=torch.Generator().manual_seed(epoch_seed)))
    elif sort_by_length:
        lengths = row_lengths(dataset)
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep their order
    else:
        order = list(range(len(dataset)))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order[skip_batches * batch_size :],
        collate_fn=collator,
        pin_memory=pin_memory,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(epoch_seed),
    )


def in_dataset_order(values, loader) -> list:
    """Per-row outputs of a pass over ``loader`` (in its sampler's order) back in the dataset's order."""
    restored = [None] * len(values)
    for position, index in enumerate(loader.sampler):
        restored[index] = values[position]
    return restored
