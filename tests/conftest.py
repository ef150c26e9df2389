"""Tiny models and data built in-process (no download): a BERT-like and a Llama-like model with hidden
size 32 and their tokenizers, a small learnable sentiment dataset, and helpers to compose real configs."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from tests.helpers import (  # noqa: F401 - these names stay importable from here
    CHAT_WORDS,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    WORDS,
    qa_rows,
    sentiment_rows,
    write_csv,
)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(folder)  # a base encoder, like MiniLM: the task head is new
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_llama")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS + ["user", "assistant", "\n", ":"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} \n {{ m['content'] }} <|im_end|> \n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant \n{% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=vocab["<pad>"],
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory) -> Path:
    """A Llama-like causal LM whose tokenizer has real chat special tokens and a ChatML-like template
    (like SmolLM2's, with a default system message), built in-process."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_chat_llama")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        token: i for i, token in enumerate(dict.fromkeys(specials + WORDS + CHAT_WORDS + ["?", ".", ","]))
    }
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system say "
        "answer<|im_end|>{% endif %}"
        "<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=vocab["<pad>"],
        bos_token_id=1,
        eos_token_id=vocab["<|im_end|>"],
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory) -> Path:
    import json

    path = tmp_path_factory.mktemp("instruction") / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in qa_rows(320)))
    return path


@pytest.fixture
def tiny_causal(tiny_chat_llama_dir, tiny_jsonl):
    """Overrides for a fast causal-LM run of the tiny chat Llama on the tiny instruction data."""
    return [
        "model=local",
        f"model.name_or_path={tiny_chat_llama_dir}",
        "data=instruction",
        f"data.path={tiny_jsonl}",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "train.epochs=2",
        "train.eval_every=8",
        "train.log_every=2",
        "train.max_length=48",
        "tracking.system_metrics=false",
        "lm_eval.reference_texts=16",
        "lm_eval.max_new_tokens=8",
    ]


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return write_csv(
        tmp_path_factory.mktemp("data") / "reviews.csv", sentiment_rows(480)
    )  # 336 train rows: 21 steps per epoch at batch 16


@pytest.fixture
def compose(tmp_path):
    """Compose the real conf/ with overrides, pointed at tmp dirs; returns a validated RunConfig."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_sweep import cli

    cli.register_resolvers()

    def _compose(*overrides: str, output_dir: Path | None = None):
        base = [
            f"output_dir={output_dir or tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=base + list(overrides))
        return cli.to_run_config(cfg)

    return _compose


@pytest.fixture
def tiny_overrides(tiny_bert_dir, tiny_csv):
    """Overrides for a fast run of the tiny BERT on the tiny data (a few seconds on CPU)."""
    return [
        "model=local",
        f"model.name_or_path={tiny_bert_dir}",
        "data=local",
        f"data.path={tiny_csv}",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "train.epochs=3",
        "train.eval_every=6",
        "train.log_every=2",
        "train.max_length=16",
        "tracking.system_metrics=false",
    ]


@pytest.fixture
def tiny(tiny_overrides):
    """Sweep trials on the tiny BERT: two epochs of 21 steps, validation every 7 (reports for the pruner)."""
    return [o for o in tiny_overrides if not o.startswith(("train.epochs", "train.eval_every"))] + [
        "train.epochs=2",
        "train.eval_every=7",
        # every block's linear layers but the pooler: the sweep tests' learning curves were tuned on these
        "method.targets=[query,key,value,attention.output.dense,intermediate.dense,output.dense]",
    ]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's binaries): URLs of databases ``optuna`` and
    ``mlflow`` owned by a password user. Skipped where PostgreSQL is not installed, unless
    LORA_SWEEP_REQUIRE_POSTGRES=1 (CI), where that is a failure."""
    from tests.servers import postgres_server

    with postgres_server() as urls:
        yield urls


@pytest.fixture
def fresh_database(postgres):
    """``fresh_database(name)``: the URL of a new, empty database on the session's PostgreSQL server."""
    import psycopg

    def create(name: str) -> str:
        with psycopg.connect(postgres["optuna"], autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return postgres["optuna"].rsplit("/", 1)[0] + f"/{name}"

    return create


@pytest.fixture(autouse=True)
def _mlflow_uri_stays_in_its_test():
    """``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which every later subprocess (a sweep
    under
    test) would inherit and write its runs to: restore the variable after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture
def sweep_in_process(tmp_path, monkeypatch, tiny):
    """``sweep_in_process(name, *extra)`` runs ``python -m lora_sweep --multirun sweeps=<name>`` in this
    process, in tmp_path; Hydra's global state and the logging it installs are undone afterwards."""
    import logging
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from lora_sweep import __main__ as entry
    from lora_sweep import run as run_module

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.chdir(tmp_path)

    def call(name: str, *extra: str) -> None:
        argv = [
            "lora_sweep",
            "--multirun",
            f"sweeps={name}",
            f"hydra.searchpath=[file://{tmp_path / 'extra_conf'}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            # explicit: an earlier test in this process may have set MLflow's process-wide tracking URI
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *tiny,
            *extra,
        ]
        monkeypatch.setattr(sys, "argv", argv)
        # a fresh process would start with nothing loaded: earlier tests here may have filled the caches
        run_module._PREPARED.clear()
        run_module._MODELS.clear()
        try:
            entry.main()
        finally:
            GlobalHydra.instance().clear()

    yield call
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.fixture
def entry_point(tmp_path, monkeypatch):
    """Run the Hydra entry point with ``overrides`` in tmp_path; Hydra's global state and the logging
    setup it installs are undone afterwards."""
    from hydra.core.global_hydra import GlobalHydra

    from lora_sweep import __main__ as entry

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.chdir(tmp_path)

    def call(*overrides: str) -> int:
        monkeypatch.setattr(sys, "argv", ["lora_sweep", *overrides])
        try:
            with pytest.raises(SystemExit) as caught:
                entry.main()
        finally:
            GlobalHydra.instance().clear()
        return caught.value.code

    yield call
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
