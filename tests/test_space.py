"""sweep/space: a sweep file's search space, parsed from Hydra's sweep syntax and sampled through Optuna,
in-process (the same errors through the command line are in tests/test_sweep.py, marked slow)."""

from __future__ import annotations

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FixedTrial

from lora_sweep.errors import ConfigError
from lora_sweep.sweep.space import SearchSpace, _in_range, format_value


def _dist(text: str):
    (param,) = SearchSpace({"x": text}).params
    return param.distribution


def test_sweep_expressions_become_optuna_distributions():
    assert _dist("choice(4, 8, 16)") == CategoricalDistribution([4, 8, 16])
    assert _dist("range(2, 9, 2)") == IntDistribution(2, 8, step=2)
    assert _dist("interval(0.0, 0.2)") == FloatDistribution(0.0, 0.2)
    assert _dist("tag(log, interval(1e-4, 1e-2))") == FloatDistribution(1e-4, 1e-2, log=True)
    assert _dist("int(interval(4, 512))") == IntDistribution(4, 512)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"train.lr": "tag(log, interval(1e-2, 1e-4))"},
            "hydra.sweeper.params.train.lr='tag(log, interval(1e-2, 1e-4))': low 0.01 > high 0.0001",
        ),
        (
            {"train.lr": "tag(log, interval(0, 1e-2))"},
            (
                "hydra.sweeper.params.train.lr='tag(log, interval(0, 1e-2))': "
                "a log scale needs low > 0 (got 0.0)"
            ),
        ),
        (
            {"method.targets": "choice(attention_qv, everything)"},
            "hydra.sweeper.params.method.targets='everything': neither a preset",
        ),
        ({"method.r": "range(8, 2)"}, "hydra.sweeper.params.method.r='range(8, 2)': range is empty"),
        (
            {"method.r": "8"},
            "hydra.sweeper.params.method.r='8': expected choice(...), range(...), interval(...)",
        ),
        (
            {"method.targets": "choice([query, value], attention_qv)"},
            (
                "hydra.sweeper.params.method.targets='choice([query, value], attention_qv)': "
                "a list is not a choice"
            ),
        ),
    ],
)
def test_bad_expressions_fail_naming_the_key_and_the_text(params, message):
    with pytest.raises(ConfigError) as caught:
        SearchSpace(params)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_alpha_ratio_or_free_alpha():
    space = SearchSpace(
        {"method.r": "choice(4, 8)"}, alpha={"ratio": [1, 2], "free": "tag(log, interval(4, 512))"}
    )
    assert space.names == ["method.r", "method.alpha_ratio", "method.alpha"]
    tied = space.sample(FixedTrial({"method.r": 8, "method.alpha_ratio": 2.0, "method.alpha": 64.0}), {})
    assert tied == {"method.r": 8, "method.alpha_ratio": 2.0}  # alpha follows the rank: not sampled
    assert space.overrides(tied) == ["method.r=8", "method.alpha_ratio=2.0", "method.alpha=null"]
    free = space.sample(FixedTrial({"method.r": 4, "method.alpha_ratio": "free", "method.alpha": 64.0}), {})
    assert free == {"method.r": 4, "method.alpha_ratio": "free", "method.alpha": 64.0}
    assert space.overrides(free) == ["method.r=4", "method.alpha_ratio=null", "method.alpha=64.0"]
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.params.method.alpha=.*already searched"):
        SearchSpace({"method.alpha": "choice(8, 16)"}, alpha={"ratio": [1]})
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.alpha.ratio=\[0.0\]: ratios must be > 0"):
        SearchSpace({}, alpha={"ratio": [0]})


def test_conditions_sample_a_parameter_only_when_it_applies():
    space = SearchSpace(
        {"method.variant": "choice(lora, dora)", "method.init": "choice(default, gaussian)"},
        conditions={"method.init": {"method.variant": ["lora", "rslora"]}},
    )
    assert space.sample(FixedTrial({"method.variant": "lora", "method.init": "gaussian"}), {}) == {
        "method.variant": "lora",
        "method.init": "gaussian",
    }
    assert space.sample(FixedTrial({"method.variant": "dora", "method.init": "gaussian"}), {}) == {
        "method.variant": "dora"
    }
    only_init = SearchSpace(
        {"method.init": "choice(default, gaussian)"}, conditions={"method.init": {"method.variant": ["lora"]}}
    )
    assert (
        only_init.sample(FixedTrial({"method.init": "gaussian"}), {"method.variant": "dora"}) == {}
    )  # the config's
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.conditions.method.init=.*not searched"):
        SearchSpace({"method.r": "choice(4)"}, conditions={"method.init": {"method.variant": ["lora"]}})
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.conditions.method.init='method.variant': must refer to a "
    ):
        SearchSpace(
            {"method.init": "choice(default)", "method.variant": "choice(lora)"},
            conditions={"method.init": {"method.variant": ["lora"]}},
        )


def test_target_sets_are_named_choices_that_become_lists():
    space = SearchSpace(
        {"method.targets": "choice(attention_qv, qkv)"}, target_sets={"qkv": ["query", "key", "value"]}
    )
    assert space.overrides({"method.targets": "qkv"}) == ["method.targets=[query,key,value]"]
    assert space.overrides({"method.targets": "attention_qv"}) == ["method.targets=attention_qv"]


def test_enqueued_values_must_be_inside_the_space():
    space = SearchSpace({"method.r": "choice(4, 8)", "train.lr": "tag(log, interval(1e-3, 1e-2))"})
    space.check_enqueued({"method.r": 8, "train.lr": 2e-3}, "hydra.sweeper.enqueue[0]")
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.enqueue\[0\].method.r=16: outside the searched range"
    ):
        space.check_enqueued({"method.r": 16}, "hydra.sweeper.enqueue[0]")
    with pytest.raises(ConfigError, match=r"^hydra.sweeper.enqueue\[1\].train.lr=0.5: outside"):
        space.check_enqueued({"train.lr": 0.5}, "hydra.sweeper.enqueue[1]")
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.enqueue\[0\].method.dropout=0.1: not a searched parameter"
    ):
        space.check_enqueued({"method.dropout": 0.1}, "hydra.sweeper.enqueue[0]")


def test_grid_needs_discrete_unconditional_parameters():
    space = SearchSpace({"method.r": "choice(2, 4)", "train.epochs": "range(1, 4)"})
    assert space.grid("hydra.sweeper.params") == {"method.r": [2, 4], "train.epochs": [1, 2, 3]}
    with pytest.raises(
        ConfigError, match=r"^hydra.sweeper.params.train.lr='interval': the grid sampler needs"
    ):
        SearchSpace({"train.lr": "interval(1e-3, 1e-2)"}).grid("hydra.sweeper.params")
    conditional = SearchSpace(
        {"method.variant": "choice(lora)", "method.init": "choice(default)"},
        conditions={"method.init": {"method.variant": ["lora"]}},
    )
    with pytest.raises(ConfigError, match=r"cannot search conditional parameters"):
        conditional.grid("hydra.sweeper.params")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (8, "8"),
        (2e-3, "0.002"),
        (["query", "value"], "[query,value]"),
        ("attention_qv", "attention_qv"),
        ("journal:/a b/c", "'journal:/a b/c'"),
        ("it's", "'it\\'s'"),
    ],
)
def test_values_are_written_as_hydra_reads_them(value, text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert format_value(value) == text
    parsed = OverridesParser.create().parse_override(f"key={text}").value()
    assert parsed == value


DISTRIBUTIONS = [
    IntDistribution(2, 16, step=2),
    IntDistribution(1, 64, log=True),
    FloatDistribution(0.0, 0.2),
    FloatDistribution(1e-4, 1e-2, log=True),
    FloatDistribution(0.0, 1.0, step=0.25),
    CategoricalDistribution(["a", "b", 4]),
]
VALUES = [-1, 0, 1, 2, 3, 4, 16, 17, 64, 65, 0.1, 0.2, 0.25, 0.3, 0.5, 1e-4, 1e-3, 0.011, 1.0, "a", "b", "c"]


@pytest.mark.parametrize("dist", DISTRIBUTIONS, ids=repr)
def test_in_range_agrees_with_optuna(dist):
    for value in VALUES:
        try:
            internal = dist.to_internal_repr(value)
        except (ValueError, TypeError):
            continue
        assert _in_range(dist, internal) == dist._contains(internal), value  # Optuna's own rule, private


def test_in_range_examples():
    assert _in_range(IntDistribution(2, 16, step=2), 4) and not _in_range(IntDistribution(2, 16, step=2), 5)
    assert not _in_range(FloatDistribution(0.0, 1.0, step=0.25), 0.3)
    assert _in_range(
        CategoricalDistribution(["a", "b"]), CategoricalDistribution(["a", "b"]).to_internal_repr("b")
    )


# --- every value a sweep can sample meets the run config's own checks -----------------------------------


def _composed(*overrides: str):
    """The run config a sweep composes (as the sweeper receives it), with no model or data behind it."""
    from hydra import compose, initialize_config_dir

    from lora_sweep import cli

    cli.register_resolvers()
    with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
        return compose(
            "config",
            ["model=local", "model.name_or_path=/nowhere", "data=local", "data.path=x.csv", *overrides],
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"params": {"method.dropout": "interval(0.0, 1.5)"}},
            "hydra.sweeper.params.method.dropout='interval(0.0, 1.5)': its high end 1.5 fails the run "
            "config's check: method.dropout=1.5: must be in [0, 1)",
        ),
        (
            {"params": {"train.warmup_ratio": "interval(-0.1, 0.5)"}},
            "hydra.sweeper.params.train.warmup_ratio='interval(-0.1, 0.5)': its low end -0.1 fails the run "
            "config's check: train.warmup_ratio=-0.1: must be in [0, 1)",
        ),
        (
            {"params": {"method.r": "range(4, 20, 8)", "train.epochs": "range(0, 3)"}},
            "hydra.sweeper.params.train.epochs='range(0, 3)': its low end 0 fails the run config's check: "
            "train.epochs=0: must be > 0",
        ),
        (
            {"alpha": {"ratio": [1, 2], "free": "interval(-4, 64)"}},
            "hydra.sweeper.alpha.free='interval(-4, 64)': its low end -4.0 fails the run config's check: "
            "method.alpha=-4.0: must be > 0",
        ),
        (
            {"params": {"train.batch_size": "choice(16, 0)"}},
            "hydra.sweeper.params -> train.batch_size=0: must be > 0",
        ),
        (
            {"baseline": {"n_trials": 1, "params": {"train.lr": "interval(0.0, 1e-4)"}}},
            "hydra.sweeper.baseline.params.train.lr='interval(0.0, 1e-4)': its low end 0.0 fails the run "
            "config's check: train.lr=0.0: must be > 0",
        ),
        (
            {"params": {"train.lr": "tag(log, interval(1e-2, 1e-4))"}},
            "hydra.sweeper.params.train.lr='tag(log, interval(1e-2, 1e-4))': low 0.01 > high 0.0001",
        ),
        (
            {"params": {"method.rank": "choice(4, 8)"}},
            "hydra.sweeper.params.method.rank='choice(4, 8)': no such config key",
        ),
    ],
)
def test_every_end_of_every_range_and_every_choice_meets_the_run_configs_checks(settings, message):
    from lora_sweep.sweep.settings import sweeper_conf
    from lora_sweep.sweep.space import check_search

    with pytest.raises(ConfigError) as caught:
        check_search(sweeper_conf({"report": {"enabled": False}, **settings}), _composed())
    assert str(caught.value) == message


def test_a_search_within_the_run_configs_ranges_passes():
    from lora_sweep.sweep.settings import sweeper_conf
    from lora_sweep.sweep.space import check_search

    conf = sweeper_conf(
        {
            "report": {"enabled": False},
            "params": {
                "method": "choice(lora, ia3)",  # method.* keys: the chosen method's, composed per choice
                "method.r": "range(2, 9, 2)",
                "method.dropout": "interval(0.0, 0.5)",
                "train.lr": "tag(log, interval(1e-4, 1e-2))",
                "method.targets": "choice(attention_qv, qkv)",
            },
            "target_sets": {"qkv": ["query", "key", "value"]},
            "conditions": {"method.r": {"method": ["lora"]}, "method.dropout": {"method": ["lora"]}},
            "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(2e-5, 2e-4))"}},
        }
    )
    check_search(conf, _composed())
