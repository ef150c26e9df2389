"""Padding-free packing of instruction rows (lora_sweep.lm_eval.PackingCollator) and length-sorted causal-LM
evaluation, on the tiny in-process chat Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_sweep.data import PACKED_TOKENS, make_loader
from lora_sweep.lm_data import IGNORE, prepare_lm_data
from lora_sweep.lm_eval import PackingCollator, evaluate_lm, lm_collator, packs_separately
from tests.helpers import varied_qa_rows


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


@pytest.fixture(scope="module")
def varied_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("varied") / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in varied_qa_rows(320)))
    return path


@pytest.fixture(scope="module")
def instruction_rows(varied_jsonl, chat_tokenizer, tmp_path_factory):
    """Validation rows of instruction data of different lengths, as a run prepares them (prompts -100)."""
    from lora_sweep.config import DataConfig

    cfg = DataConfig(
        name="qa",
        source="local",
        kind="instruction",
        path=str(varied_jsonl),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
    )
    return prepare_lm_data(cfg, chat_tokenizer, max_length=48).splits["validation"]


def _model(folder, attention: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention)


def test_packing_keeps_the_rows_prompt_masks_and_restarts_positions(chat_tokenizer, instruction_rows):
    rows = [instruction_rows[i] for i in range(6)]
    collator = PackingCollator(chat_tokenizer.pad_token_id, budget=48)
    batch = collator(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", PACKED_TOKENS}  # no attention mask
    assert batch["input_ids"].shape[0] < len(rows) and batch["input_ids"].shape[1] <= 48
    assert int(batch[PACKED_TOKENS]) == sum(len(r["input_ids"]) for r in rows)
    # every row appears once, whole, its labels as prepared except the first (never predicted from the
    # row before it), at positions 0..n-1
    found = []
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        starts = [i for i, p in enumerate(positions.tolist()) if p == 0] + [len(positions)]
        for a, b in zip(starts, starts[1:]):
            found.append((ids[a:b].tolist(), labels[a:b].tolist(), positions[a:b].tolist()))
    for row in rows:
        n = len(row["input_ids"])
        expected = (row["input_ids"], [IGNORE, *row["labels"][1:]], list(range(n)))
        assert found.count(expected) == 1
    trained = sum(label != IGNORE for r in rows for label in r["labels"][1:])
    assert int((batch["labels"] != IGNORE).sum()) == trained


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_gives_the_padded_batchs_loss(
    tiny_chat_llama_dir, chat_tokenizer, instruction_rows, attention
):
    """The model's loss over a padded batch is the mean over every trained token of the batch (not a mean
    of per-row means); the packed batch's loss is the same token mean over the same tokens: they must agree.
    Also true with every row in one sequence (flash attention's layout), whose mask sdpa/eager build from
    the position ids."""
    model = _model(tiny_chat_llama_dir, attention).eval()
    # as a packed run trains: with a KV cache, transformers skips the packed-sequence mask
    assert not packs_separately(model, torch.device("cpu"))
    model.config.use_cache = False
    rows = [instruction_rows[i] for i in range(12)]
    padded = lm_collator(chat_tokenizer)(rows)
    with torch.no_grad():
        padded_loss = model(**padded).loss.item()
        for budget in (48, None):
            batch = PackingCollator(chat_tokenizer.pad_token_id, budget=budget)(rows)
            batch.pop(PACKED_TOKENS)
            assert model(**batch).loss.item() == pytest.approx(padded_loss, rel=1e-5)
    # not by accident: the same concatenation with positions that do not restart lets rows attend to
    # each other, and the loss moves
    batch = PackingCollator(chat_tokenizer.pad_token_id, budget=None)(rows)
    batch.pop(PACKED_TOKENS)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    with torch.no_grad():
        assert abs(model(**batch).loss.item() - padded_loss) > 20 * 1e-5 * padded_loss
    assert packs_separately(model, torch.device("cpu"))


def test_length_sorted_evaluation_gives_the_same_metrics_and_rows_in_order(
    tiny_chat_llama_dir, chat_tokenizer, instruction_rows
):
    model = _model(tiny_chat_llama_dir)
    cpu = torch.device("cpu")
    natural = make_loader(instruction_rows, lm_collator(chat_tokenizer), 8, shuffle=False)
    ordered = make_loader(
        instruction_rows, lm_collator(chat_tokenizer), 8, shuffle=False, sort_by_length=True
    )
    lengths = [len(instruction_rows[i]["input_ids"]) for i in ordered.sampler]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1
    assert list(ordered.sampler) != list(natural.sampler)  # the test data is not sorted already
    a = evaluate_lm(model, natural, cpu, "fp32", per_row=True)
    b = evaluate_lm(model, ordered, cpu, "fp32", per_row=True)
    assert b["samples"] == a["samples"] == len(instruction_rows)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
    assert b["row_losses"] == pytest.approx(a["row_losses"], rel=1e-5)
    # the rows' losses are the dataset's order: row i's loss is that of row i alone
    single = make_loader([instruction_rows[3]], lm_collator(chat_tokenizer), 1, shuffle=False)
    alone = evaluate_lm(model, single, cpu, "fp32")["loss"]
    assert b["row_losses"][3] == pytest.approx(alone, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attention", ["sdpa", "flash_attention_2"])
def test_packed_loss_equals_padded_loss_on_gpu(
    tiny_chat_llama_dir, chat_tokenizer, instruction_rows, attention
):
    """On a GPU in bf16: sdpa with rows of at most max_length tokens, flash attention (varlen, from the
    position ids) with every row in one sequence, as the causal-LM task packs for each."""
    if attention == "flash_attention_2":
        pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_chat_llama_dir, attn_implementation=attention, dtype=torch.bfloat16
    ).cuda()
    model.eval().config.use_cache = False
    assert packs_separately(model, torch.device("cuda"))
    rows = [instruction_rows[i] for i in range(12)]
    padded = {k: v.cuda() for k, v in lm_collator(chat_tokenizer)(rows).items()}
    budget = None if attention.startswith("flash") else 48
    packed = {k: v.cuda() for k, v in PackingCollator(chat_tokenizer.pad_token_id, budget, 8)(rows).items()}
    packed.pop(PACKED_TOKENS)
    with torch.no_grad():
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=2e-2)
