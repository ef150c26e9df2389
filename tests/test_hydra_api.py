"""lora_sweep/hydra_api: a command line Hydra cannot compose is one line naming the key and the value, found
by composing it once before ``hydra.main`` runs, in-process (the same through real subprocesses, batched:
tests/test_bad_input.py, slow)."""

from __future__ import annotations

import pytest

from lora_sweep import cli
from lora_sweep.hydra_api import args_parser, command_line_error, parse_command_line

CONF = str(cli.CONF_DIR)
cli.register_resolvers()


def error(*argv: str) -> str | None:
    return command_line_error(list(argv), CONF, "config")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train.lrr=1"], "train.lrr=1: no such config key (did you mean train.lr?)"),
        (["-m", "train.lrr=1"], "train.lrr=1: no such config key (did you mean train.lr?)"),
        (["trian.lr=1"], "trian.lr=1: no such config key (did you mean train.lr?)"),
        (["methd=lora"], "methd='lora': no such config key (did you mean method?)"),
        (["hydra.run.dirr=x"], "hydra.run.dirr='x': no such config key (did you mean hydra.run.dir?)"),
        (
            ["--multirun", "sweeps=quick", "hydra.sweeper.n_trials=abc"],
            "hydra.sweeper.n_trials='abc': expected an integer",
        ),
        (
            ["-m", "sweeps=quick", "hydra.sweeper.n_trial=3"],
            "hydra.sweeper.n_trial=3: no such config key (did you mean hydra.sweeper.n_trials?)",
        ),
        (
            ["hydra.sweeper.n_trials=3"],
            "hydra.sweeper.n_trials=3: no such config key (a setting of hydra/sweeper=lora_optuna, not of "
            "the selected sweeper; a sweep file selects it: sweeps=<name>)",
        ),
        (
            ["method=nope"],
            "method='nope': no such method option; options: adalora, full, ia3, loha, lokr, lora, vera",
        ),
        (
            ["--multirun", "method=lor"],
            "method='lor': no such method option (did you mean lora?); options: adalora, full, ia3, loha, "
            "lokr, lora, vera",
        ),
        (["-m", "method=lora,nope"], "method='nope': no such method option"),  # the basic sweeper's 2nd job
        (["-m", "method.r=8,16", "train.lrr=1,2"], "train.lrr=1: no such config key"),
        (["hydra/launcher=nope"], "hydra/launcher='nope': no such hydra/launcher option; options: basic"),
        (
            ["sweeps=nope"],
            "sweeps='nope': no such sweeps option; options: causal_gpu, causal_quick, default, methods",
        ),
        (  # OmegaConf cannot merge a mapping into a null typed node: said in one line, not a traceback
            ["-m", "sweeps=quick", "hydra.sweeper.baseline.sampler={name:random}"],
            "hydra.sweeper.baseline.sampler={'name': 'random'}: this setting is null in the composed config",
        ),
        (
            ["-m", "sweeps=quick", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_trials=abc"],
            "hydra.sweeper.n_trials='abc': expected an integer",
        ),
        (["train.lr=[1"], "train.lr='[1': not a valid override (no viable alternative at input '[1')"),
        (
            ["method.r=8,16"],
            "method.r='8,16': a comma list or sweep runs several jobs: add --multirun; for a list write "
            "method.r=[...], for text quote it",
        ),
        (
            ["-m", "sweeps=quick", "hydra.sweeper.study_name=a,b"],
            "hydra.sweeper.study_name='a,b': Hydra's own settings cannot be swept; to give this text as the "
            "value, quote it: 'hydra.sweeper.study_name=\"a,b\"'",
        ),
        (["+train.lr=1"], "train.lr=1: already set: drop the + (train.lr=1) or write ++train.lr=..."),
        (["~train.lrr"], "train.lrr='~train.lrr': no such config key to delete"),
        (
            ["tracking.tracking_uri=postgresql://u:secretpw@h/db", "tracking.experimentt=x"],
            "tracking.experimentt='x': no such config key (did you mean tracking.experiment?)",
        ),
        (
            ["tracking.tracking_uri=postgresql://u:secretpw@h/db", "tracking.tracking_uri=abc,def"],
            "tracking.tracking_uri='abc,def': a comma list",
        ),
    ],
)
def test_what_hydra_cannot_compose_is_one_line_naming_the_key(argv, expected):
    line = error(*argv)
    assert line is not None and line.startswith(expected) and "\n" not in line, line
    assert "secretpw" not in line


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["method.r=16", "train.lr=1e-3", "tags.purpose=baseline"],
        ["--multirun", "method.r=8,16,64"],
        ["-m", "method=lora,ia3", "train.lr=range(1,3)"],
        ["--multirun", "sweeps=quick", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        ["-m", "sweeps=quick", "hydra.sweeper.study_name='a,b'"],
        ["-m", "sweeps=quick", "hydra.sweeper.lr_from_baseline={ratio:8,span:[2,20]}"],
        ["-m", "sweeps=quick", "hydra.sweeper.ladder={fractions:[0.25],keep:0.5}"],
        ["+method.options.lora_bias=true", "~lm_eval.num_prompts"],
        ["model=local"],  # a missing value (model.name_or_path=???) is the run config's to report
        ["--cfg", "job", "train.lrr=1"],  # Hydra's own output: handed over as it is
        ["--help"],
    ],
)
def test_what_composes_goes_on_to_hydra(argv):
    assert error(*argv) is None


def test_a_searchpath_folder_on_the_command_line_is_composed_with(tmp_path):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("# @package _global_\nmethod: {name: mine}\n")
    assert error(f"hydra.searchpath=[file://{tmp_path}]", "method=mine") is None
    assert error("method=mine").startswith("method='mine': no such method option")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "--config-name", "other", "a=1", "b=2"],
        ["--multirun", "--cfg", "job", "c=3"],
        ["-cn", "x", "-cp", "y", "-cd", "z", "--resolve", "-p", "pkg", "d=4"],
        ["--info"],
        ["-i", "plugins", "--run"],
        ["--hydra-help", "-sc"],
        ["--experimental-rerun", "f.pickle"],
        ["-h", "e=5"],
        [],
    ],
)
def test_the_command_line_is_split_as_hydra_main_splits_it(argv):
    """Our parser against Hydra's own (private: hydra._internal.utils.get_args_parser): same flags, same
    values. A Hydra upgrade that adds or changes a flag fails here."""
    from hydra._internal.utils import get_args_parser

    assert vars(parse_command_line(argv)) == {**vars(get_args_parser().parse_args(argv)), "version": False}


def test_every_flag_of_hydras_parser_is_known():
    from hydra._internal.utils import get_args_parser

    theirs = {option for action in get_args_parser()._actions for option in action.option_strings}
    ours = {option for action in args_parser()._actions for option in action.option_strings}
    assert ours == theirs


def test_a_flag_hydra_refuses_goes_to_hydra():
    assert parse_command_line(["--nope"]) is None and parse_command_line(["--cfg", "everything"]) is None
    assert error("--nope", "train.lrr=1") is None


def test_hydra_full_error_hands_everything_to_hydra(monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert error("train.lrr=1") is None


@pytest.mark.parametrize("mode", [[], ["--multirun"]])
def test_the_entry_point_prints_one_line_and_exits_2_creating_nothing(entry_point, capsys, tmp_path, mode):
    assert entry_point(*mode, "train.lrr=1") == 2
    captured = capsys.readouterr()
    assert captured.err == "error: train.lrr=1: no such config key (did you mean train.lr?)\n"
    assert not list(tmp_path.iterdir())  # no output folder, no multirun folder, no MLflow store
