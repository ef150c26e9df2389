"""A command line Hydra cannot compose, as one line naming the key and the value, before Hydra runs.

Hydra reports its own errors (a typo'd key, a value of the wrong type, an unknown config group option, an
override it cannot parse) inside ``hydra.main``, as 5-7 lines and exit code 1, for a single run and for
``--multirun`` alike. :func:`command_line_error` composes the same command line once, through Hydra's
public compose API (``initialize_config_dir`` + ``compose``, the same config folder, config name and
overrides: ``hydra.*`` keys, ``hydra.searchpath``, sweep files), and turns what fails into one line;
``python -m lora_sweep`` prints it as ``error: <line>`` and exits 2 before ``hydra.main`` starts. A command
line that composes costs one composition (~0.15 s) and goes on to Hydra unchanged.

Only Hydra's public API is used. The command line is split as ``hydra.main`` splits it, by a parser with
the flags of Hydra's own (``hydra._internal.utils.get_args_parser``, private): tests/test_hydra_api.py
checks that the two agree, so a Hydra upgrade that adds or changes a flag fails there, in one place.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from lora_sweep.errors import ConfigError

# flags whose output is Hydra's own (help, version, config printing, shell completion) or which move the
# config folder: the command line goes to Hydra as it is
HANDED_OVER = (
    "help",
    "hydra_help",
    "version",
    "cfg",
    "info",
    "package",
    "shell_completion",
    "config_path",
    "config_dir",
    "experimental_rerun",
)
MAX_COMPOSITIONS = 16  # a basic-sweeper grid: each value of each swept key composed once, up to this many


class _Unparsable(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # Hydra's own parser reports a bad flag: hand the command line over
        raise _Unparsable(message)


def args_parser() -> argparse.ArgumentParser:
    """The flags of ``hydra.main``'s parser, with the same names, arities and destinations."""
    parser = _Parser(add_help=False, prog="lora_sweep")
    for flags in (("--help", "-h"), ("--hydra-help",), ("--version",), ("--resolve",), ("--run", "-r")):
        parser.add_argument(*flags, action="store_true")
    parser.add_argument("--multirun", "-m", action="store_true")
    parser.add_argument("--shell-completion", "-sc", action="store_true")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--cfg", "-c", choices=["job", "hydra", "all"])
    parser.add_argument("--package", "-p")
    parser.add_argument("--config-path", "-cp")
    parser.add_argument("--config-name", "-cn")
    parser.add_argument("--config-dir", "-cd")
    parser.add_argument("--experimental-rerun")
    parser.add_argument(
        "--info",
        "-i",
        const="all",
        nargs="?",
        choices=["all", "config", "defaults", "defaults-tree", "plugins", "searchpath"],
    )
    return parser


def parse_command_line(argv: Sequence[str]) -> Any:
    """``argv`` split as ``hydra.main`` splits it (``overrides``, ``multirun``, ``config_name``, ...), or
    None where Hydra's parser would refuse it (Hydra then says why)."""
    try:
        return args_parser().parse_args(list(argv))
    except _Unparsable:
        return None


def command_line_error(argv: Sequence[str], config_dir: str, config_name: str) -> str | None:
    """Why Hydra could not compose ``argv`` (``key=value: problem``, one line, passwords hidden), or None
    when it composes, or when the command line is for Hydra itself (``--help``, ``--cfg``...)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for Hydra's full report
        return None
    args = parse_command_line(argv)
    if args is None or any(getattr(args, flag, None) for flag in HANDED_OVER):
        return None
    try:
        check_overrides(list(args.overrides), config_dir, args.config_name or config_name, args.multirun)
    except ConfigError as err:
        return str(err)
    return None


def check_overrides(overrides: list[str], config_dir: str, config_name: str, multirun: bool) -> None:
    """Compose ``overrides`` as Hydra will; raise the one-line ``ConfigError`` of the first that fails."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as err:  # OverrideParseException, or the grammar's own syntax error
            key, _, value = text.partition("=")
            problem = str(err).splitlines()[0]
            raise ConfigError(
                key, value, f"not a valid override ({problem}); quote a value Hydra reads as syntax"
            ) from None
    for override in parsed:
        if override.is_sweep_override() and not multirun:
            raise ConfigError(
                override.key_or_group,
                _typed_value(override),
                "a comma list or sweep runs several jobs: add --multirun; for a list write "
                f"{override.key_or_group}=[...], for text quote it",
            )
        if override.is_sweep_override() and override.is_hydra_override():
            raise ConfigError(
                override.key_or_group,
                _typed_value(override),
                "Hydra's own settings cannot be swept; to give this text as the value, quote it: "
                f"'{override.key_or_group}=\"{_typed_value(override)}\"'",
            )
    for variant in _variants(parsed):
        _compose(variant, parsed, config_dir, config_name)


def _variants(parsed: list) -> Iterator[list[str]]:
    """The command lines Hydra composes: every override as given, each swept one (``method.r=8,16``) at
    its first value, then at each other value in turn (what the basic sweeper's jobs compose)."""
    from hydra.errors import HydraException

    values: list[list[str]] = []
    for override in parsed:
        if not override.is_sweep_override():
            values.append([override.input_line])
            continue
        try:
            each = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
        except HydraException:  # an interval or a glob: the sweeper expands it, not a job's composition
            each = []
        values.append(each)
    base = [options[0] if options else None for options in values]
    yield [text for text in base if text]
    count = 1
    for i, options in enumerate(values):
        for option in options[1:]:
            if count >= MAX_COMPOSITIONS:
                return
            count += 1
            variant = [*base[:i], option, *base[i + 1 :]]
            yield [text for text in variant if text]


def _compose(overrides: list[str], parsed: list, config_dir: str, config_name: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise _one_line(err, overrides, parsed, config_dir, config_name) from None
    except AttributeError as err:  # OmegaConf cannot merge a mapping into a typed setting that is null
        culprit = next((o for o in parsed if f"full_key: {o.key_or_group}\n" in f"{err}\n"), None)
        if culprit is None or "'NoneType'" not in str(err):
            raise
        raise ConfigError(
            culprit.key_or_group,
            _typed_value(culprit),
            "this setting is null in the composed config, and Hydra cannot merge a mapping into a null "
            "setting from the command line: give it in a sweep file (hydra: sweeper: ...), where it merges",
        ) from None


def _one_line(err: Exception, overrides: list[str], parsed: list, config_dir: str, config_name: str):
    """The ConfigError for Hydra's composition error ``err``: which override, and what is wrong with it."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    message = str(err)
    by_line = {o.input_line: o for o in parsed}
    for text in overrides:  # a swept override's variant is not in parsed as such
        if text not in by_line:
            by_line[text] = _parse(text)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = [str(o) for o in err.options or []]
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        listing = f"; options: {', '.join(options)}" if options else ""
        given = any(by_line[t].key_or_group == group for t in overrides)
        where = "" if given else f" ({message.splitlines()[0]})"  # a defaults list names it, not the command
        return ConfigError(group, option, f"no such {group} option{hint}{listing}{where}")
    cause = _omegaconf_cause(err)
    full_key = getattr(cause, "full_key", None)
    # which override: the one Hydra's message repeats, else the first with the key OmegaConf or Hydra names
    tests = (
        lambda t: f"override {t}" in message or f"'{t}'" in message,
        lambda t: by_line[t].key_or_group == full_key,
        lambda t: f"'{by_line[t].key_or_group}'" in message,
    )
    culprit = next((by_line[t] for test in tests for t in overrides if test(t)), None)
    if culprit is None:
        return ConfigError("command line", " ".join(overrides), message.splitlines()[0])
    key, value = culprit.key_or_group, _typed_value(culprit)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and not message.startswith(
        "Could not append"
    ):
        rest = [t for t in overrides if t != culprit.input_line]
        return ConfigError(key, value, "no such config key" + _suggestion(key, rest, config_dir, config_name))
    if isinstance(cause, ValidationError):
        return ConfigError(key, value, _type_problem(str(cause).splitlines()[0]))
    if message.startswith("Could not delete"):
        return ConfigError(key, culprit.input_line, "no such config key to delete")
    if message.startswith("Could not append"):
        return ConfigError(
            key, value, f"already set: drop the + ({culprit.input_line.lstrip('+')}) or write ++{key}=..."
        )
    detail = str(cause).splitlines()[0] if cause is not None else ""
    return ConfigError(key, value, message.splitlines()[0] + (f": {detail}" if detail else ""))


def _parse(text: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(text)


def _typed_value(override) -> Any:
    """The value as the command line gave it: a plain value parsed (``1``, ``'abc'``), a sweep as text."""
    if override.is_sweep_override():
        return override.input_line.partition("=")[2]
    try:
        return override.value()
    except Exception:  # noqa: BLE001 - a value Hydra cannot even evaluate: show its text
        return override.get_value_element_as_str()


def _omegaconf_cause(err: BaseException):
    from omegaconf.errors import OmegaConfBaseException

    seen = err
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _type_problem(text: str) -> str:
    for word, problem in (
        ("Integer", "expected an integer"),
        ("Float", "expected a number"),
        ("Boolean", "expected true or false"),
    ):
        if f"converted to {word}" in text:
            return problem
    return text


def _suggestion(key: str, overrides: list[str], config_dir: str, config_name: str) -> str:
    """`` (did you mean train.lr?)``: the closest key of the config the other overrides compose, or ''."""
    keys = _keys(overrides, config_dir, config_name)
    if not keys:
        return ""
    parent, _, leaf = key.rpartition(".")
    if not parent or parent in keys:  # the typo is in the last name: compare it with its siblings only
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)
        if close:
            return f" (did you mean {parent + '.' if parent else ''}{close[0]}?)"
    else:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
        if close:
            return f" (did you mean {close[0]}?)"
    if key.startswith("hydra.sweeper."):
        from lora_sweep.sweep.settings import LoraOptunaSweeperConf

        if leaf in LoraOptunaSweeperConf.__dataclass_fields__:
            return (
                " (a setting of hydra/sweeper=lora_optuna, not of the selected sweeper; a sweep file "
                "selects it: sweeps=<name>)"
            )
    return ""


def _keys(overrides: list[str], config_dir: str, config_name: str) -> list[str]:
    """Every dotted key of the config composed with ``overrides`` (or, if those fail too, with none)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for attempt in (overrides, []):
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                cfg = compose(config_name, overrides=attempt, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException):
            continue
        return list(_walk(OmegaConf.to_container(cfg, resolve=False)))
    return []


def _walk(tree: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            yield key
            yield from _walk(value, key)
