"""The causal-LM task's training batches: data.packing=true on instruction rows trains end to end with the
padded run's numbers (the same rows per batch, the same token-mean loss), and a model whose attention would
mix packed sequences is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_sweep.errors import ConfigError
from tests.helpers import varied_qa_rows


@pytest.fixture(scope="module")
def varied_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("varied") / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in varied_qa_rows(320)))
    return path


def test_a_packed_run_trains_to_the_padded_runs_numbers(tmp_path, compose, tiny_causal, varied_jsonl):
    """Batches hold the same rows packed or padded, and the loss is the same token mean: with dropout off
    the two runs take the same steps, so their validation (padded either way) agrees to float tolerance."""
    from mlflow.tracking import MlflowClient

    from lora_sweep.record import read_record
    from lora_sweep.run import run

    common = [
        *tiny_causal,
        f"data.path={varied_jsonl}",
        "method.targets=all_linear",
        "method.dropout=0",
        "train.lr=1e-2",
        "train.max_steps=6",
        "train.eval_every=3",
        "lm_eval.reference_texts=0",
        "lm_eval.max_new_tokens=2",
        "lm_eval.num_prompts=1",
    ]
    padded = run(compose(*common, output_dir=tmp_path / "padded"))
    packed = run(compose(*common, "data.packing=true", output_dir=tmp_path / "packed"))
    assert packed.status == padded.status == "completed"
    assert [e["step"] for e in packed.evaluations] == [3, 6]
    assert packed.evaluations == pytest.approx(padded.evaluations, rel=1e-4)
    assert packed.evaluations[-1]["loss"] < packed.evaluations[0]["loss"]  # it learns
    assert packed.metrics["test_loss"] == pytest.approx(padded.metrics["test_loss"], rel=1e-4)
    # the record and MLflow say the run was packed
    on_disk = read_record(tmp_path / "packed")
    assert on_disk["config"]["data"]["packing"] is True
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(on_disk["mlflow"]["run_id"]).data.params["data.packing"] == "True"


def test_packing_is_refused_for_a_model_that_mixes_packed_sequences(
    compose, tiny_causal, tiny_chat_llama_dir
):
    """BLOOM's ALiBi attention builds its mask without the position ids: packed rows would see each other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM

    from lora_sweep.tasks import get_task

    cfg = compose(*tiny_causal, "data.packing=true")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_llama_dir)
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ConfigError) as raised:
        get_task(cfg).train_collator(tokenizer, cfg, bloom)
    assert str(raised.value) == (
        "data.packing=True: bloom lets packed sequences attend to each other "
        "(model.attn_implementation=sdpa); use data.packing=false"
    )
    llama = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)
    collator = get_task(cfg).train_collator(tokenizer, cfg, llama)
    assert type(collator).__name__ == "PackingCollator" and collator.budget == cfg.train.max_length


def test_packing_needs_causal_lm_data(compose, tiny_overrides):
    with pytest.raises(ConfigError) as raised:
        compose(*tiny_overrides, "+data.packing=true")
    assert str(raised.value) == (
        "data.packing=True: packing applies to data.kind=text or instruction (this is classification)"
    )
