"""Causal language models: prompt masking, packing, perplexity, LoRA and full fine-tuning through the same
loop, generations and forgetting in the record and in MLflow, on a tiny in-process chat Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lora_sweep.errors import ConfigError
from lora_sweep.lm_data import IGNORE, encode_conversation, pack, prepare_lm_data
from lora_sweep.lm_eval import evaluate_lm, lm_collator, token_nll
from lora_sweep.tasks import metric_direction


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_chat_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_llama_dir)


def _trained_tokens(tokenizer, encoded) -> list[str]:
    return tokenizer.convert_ids_to_tokens(
        [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE]
    )


def test_prompt_tokens_are_masked_and_answers_with_their_end_of_turn_are_trained(chat_tokenizer):
    messages = [
        {"role": "user", "content": "what is the plot ?"},
        {"role": "assistant", "content": "good fun ."},
        {"role": "user", "content": "and the cast ?"},
        {"role": "assistant", "content": "dull ."},
    ]
    encoded = encode_conversation(chat_tokenizer, messages, max_length=64)
    tokens = chat_tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[:4] == ["<|im_start|>", "system", "say", "answer"]  # the template's default system message
    # exactly the two answers, each with its end-of-turn token, are trained on; every prompt token is -100
    assert _trained_tokens(chat_tokenizer, encoded) == [
        "good",
        "fun",
        ".",
        "<|im_end|>",
        "dull",
        ".",
        "<|im_end|>",
    ]
    for _token, label, token_id in zip(tokens, encoded["labels"], encoded["input_ids"]):
        assert label in (IGNORE, token_id)
    first_answer = tokens.index("good")
    assert all(label == IGNORE for label in encoded["labels"][:first_answer])
    # truncation keeps the labels aligned with the tokens
    short = encode_conversation(chat_tokenizer, messages, max_length=first_answer + 2)
    assert len(short["labels"]) == first_answer + 2 and _trained_tokens(chat_tokenizer, short) == [
        "good",
        "fun",
    ]


def test_instruction_file_with_prompt_response_or_messages(
    tmp_path, compose, chat_tokenizer, tiny_chat_llama_dir
):
    rows = [
        {"prompt": f"what is the movie {w} ?", "response": f"{w} ."}
        for w in ["good", "bad", "dull", "fun"] * 10
    ]
    flat = tmp_path / "qa.jsonl"
    flat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["response"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    cfg_flat = compose(
        "model=local", f"model.name_or_path={tiny_chat_llama_dir}", "data=instruction", f"data.path={flat}"
    )
    cfg_chat = compose(
        "model=local", f"model.name_or_path={tiny_chat_llama_dir}", "data=instruction", f"data.path={chat}"
    )
    assert (
        cfg_flat.model.task == "causal_lm"
        and cfg_flat.objective.metric == "loss"
        and metric_direction(cfg_flat.objective.metric) == "minimize"
    )
    a = prepare_lm_data(cfg_flat.data, chat_tokenizer, 64)
    b = prepare_lm_data(cfg_chat.data, chat_tokenizer, 64)
    assert a.sizes == b.sizes == {"train": 32, "validation": 4, "test": 4}
    for split in ("train", "validation", "test"):  # both formats give the same tokens and labels
        assert (
            a.splits[split]["input_ids"] == b.splits[split]["input_ids"]
            and a.splits[split]["labels"] == b.splits[split]["labels"]
        )
    for row in a.splits["train"]:
        trained = _trained_tokens(chat_tokenizer, row)
        assert trained[-2:] == [".", "<|im_end|>"] and len(trained) == 3
    assert a.prompts and a.prompts[0][-1]["role"] == "user"  # test prompts kept for the generations
    assert prepare_lm_data(cfg_flat.data, chat_tokenizer, 64).from_cache


def test_text_packing_cuts_fixed_blocks_of_every_token(
    tmp_path, compose, chat_tokenizer, tiny_chat_llama_dir
):
    docs = [" ".join(["good movie and the plot"] * (i % 4 + 1)) for i in range(60)]
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(docs) + "\n\n")
    cfg = compose(
        "model=local",
        f"model.name_or_path={tiny_chat_llama_dir}",
        "data=text",
        f"data.path={path}",
        "data.packing=true",
        "data.split.validation=0.1",
        "data.split.test=0.1",
    )
    data = prepare_lm_data(cfg.data, chat_tokenizer, 16)
    train = data.splits["train"]
    lengths = [len(ids) for ids in train["input_ids"]]
    assert set(lengths[:-1]) == {16} and 1 < lengths[-1] <= 16
    assert train["labels"] == train["input_ids"]  # plain text: every token is a target
    eos = chat_tokenizer.eos_token_id
    stream = [t for ids in train["input_ids"] for t in ids]
    assert stream.count(eos) == 48  # 48 training documents, one EOS after each
    assert (
        sum(len(d.split()) for d in docs)
        == sum(len(ids) for s in data.splits.values() for ids in s["input_ids"]) - 60
    )
    blocks = pack(train.select(range(2)), 4, eos)
    assert all(len(b) <= 4 for b in blocks["input_ids"])


def test_perplexity_is_exact_on_a_known_case(tiny_chat_llama_dir, chat_tokenizer):
    """A model with a zeroed LM head predicts the uniform distribution: perplexity = vocabulary size, and
    the loss is token-weighted over the whole split (batches of different sizes)."""
    from transformers import AutoModelForCausalLM

    from lora_sweep.data import make_loader

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir).eval()
    rows = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * 2 + ids[2:]}
        for ids in ([5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21, 22])
    ]
    loader = make_loader(rows, lm_collator(chat_tokenizer), 2, shuffle=False)  # batches of 2 and 1 rows
    metrics = evaluate_lm(model, loader, torch.device("cpu"), "fp32")
    # the same number computed by hand: every predicted token's -log p, summed, over the count
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            for t in range(1, len(row["input_ids"])):
                if row["labels"][t] != IGNORE:
                    nll -= torch.log_softmax(logits[t - 1], -1)[row["labels"][t]].item()
                    count += 1
    assert count == 4 + 1 + 7
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5) and metrics["perplexity"] == pytest.approx(
        math.exp(nll / count), rel=1e-5
    )
    with torch.no_grad():
        model.lm_head.weight.zero_()
    uniform = evaluate_lm(model, loader, torch.device("cpu"), "fp32")
    assert uniform["perplexity"] == pytest.approx(model.config.vocab_size, rel=1e-5)
    # and the model's own loss agrees with ours on a batch
    batch = lm_collator(chat_tokenizer)(rows)
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir)(**batch)
    total, n = token_nll(out.logits, batch["labels"])
    assert out.loss.item() == pytest.approx((total / n).item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_lora_and_full_fine_tuning_through_the_same_loop(tmp_path, compose, tiny_causal, method):
    from mlflow.tracking import MlflowClient

    from lora_sweep.run import run

    lora = ["method.targets=all_linear", "train.lr=1e-2"]
    cfg = compose(
        *tiny_causal,
        f"method={method}",
        *(lora if method == "lora" else ["train.lr=3e-3"]),
        output_dir=tmp_path / method,
    )
    record = run(cfg)
    m = record.metrics
    assert record.status == "completed" and m["objective_metric"] == "loss"
    first, best = record.evaluations[0], min(e["loss"] for e in record.evaluations)
    assert m["best_val_loss"] == best and m["best_val_perplexity"] == pytest.approx(math.exp(best))
    assert m["test_perplexity"] == pytest.approx(math.exp(m["test_loss"]))
    assert best < first["loss"]  # it learned something
    assert (
        (record.params["trainable_ratio"] == 1.0)
        if method == "full"
        else record.params["trainable_ratio"] < 0.5
    )
    # forgetting measured on out-of-task text before and after; the generations are in the record and folder
    assert (
        m["reference_perplexity_before"] > 1
        and m["reference_perplexity_after"] > 1
        and m["reference_texts"] == 16
    )
    assert len(record.generations) == 4 and all(set(g) == {"prompt", "response"} for g in record.generations)
    assert json.loads((tmp_path / method / "generations.json").read_text()) == record.generations
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = record.mlflow["run_id"]
    assert "generations.json" in {a.path for a in client.list_artifacts(run_id)}
    table = json.loads(Path(client.download_artifacts(run_id, "generations.json", str(tmp_path))).read_text())
    assert table["columns"] == ["prompt", "response"] and [row[0] for row in table["data"]] == [
        g["prompt"] for g in record.generations
    ]
    history = client.get_metric_history(run_id, "val_perplexity")
    assert [h.step for h in history] == [e["step"] for e in record.evaluations]
    assert client.get_run(run_id).data.metrics["reference_perplexity_after"] == pytest.approx(
        m["reference_perplexity_after"]
    )


def test_the_untrained_lora_model_gives_the_base_models_reference_perplexity(tmp_path, compose, tiny_causal):
    """LoRA starts as a no-op (B = 0), so before training it scores the reference text like the base."""
    from lora_sweep import tasks
    from lora_sweep.run import base_model, prepare

    cfg = compose(*tiny_causal)
    prepared = prepare(cfg)
    model, _ = base_model(cfg, prepared)
    before = tasks.before_training(
        model, prepared.tokenizer, cfg, prepared.spec.source, torch.device("cpu"), "fp32"
    )
    texts = tasks.reference_texts(16)
    from lora_sweep.methods import apply_method

    lora = apply_method(model, cfg.method, prepared.spec)
    after = tasks._reference_ppl(lora, prepared.tokenizer, cfg, torch.device("cpu"), "fp32", texts)
    lora.unload()
    assert before["reference_perplexity_before"] == pytest.approx(after, rel=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_chat_llama_dir, chat_tokenizer):
    from transformers import AutoModelForCausalLM

    from lora_sweep.models import set_gradient_checkpointing

    batch = lm_collator(chat_tokenizer)(
        [{"input_ids": [5, 6, 7, 8, 9], "attention_mask": [1] * 5, "labels": [5, 6, 7, 8, 9]}]
    )
    grads = []
    for enabled in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama_dir).train()
        set_gradient_checkpointing(model, enabled)
        assert model.is_gradient_checkpointing == enabled
        model(**batch).loss.backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=minilm"], "model.task='sequence_classification': does not fit data.kind=instruction"),
        (
            ["objective.metric=accuracy"],
            "objective.metric='accuracy': a causal_lm run reports loss, perplexity",
        ),
        (["lm_eval.max_new_tokens=0"], "lm_eval.max_new_tokens=0: must be > 0"),
    ],
)
def test_causal_config_errors_name_the_key(compose, tiny_causal, overrides, expected):
    with pytest.raises(ConfigError) as err:
        compose(*tiny_causal, *overrides)
    assert str(err.value).startswith(expected)


def test_instruction_data_needs_a_chat_template(tmp_path, compose, tiny_bert_dir, tiny_jsonl):
    from transformers import AutoTokenizer

    cfg = compose(
        "model=local", f"model.name_or_path={tiny_bert_dir}", "data=instruction", f"data.path={tiny_jsonl}"
    )
    with pytest.raises(ConfigError, match="needs a tokenizer with a chat template"):
        prepare_lm_data(cfg.data, AutoTokenizer.from_pretrained(tiny_bert_dir), 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_and_gradient_checkpointing_on_gpu(tmp_path, compose, tiny_causal, method):
    from lora_sweep.run import run

    cfg = compose(
        *tiny_causal,
        f"method={method}",
        "train.device=cuda",
        "train.precision=bf16",
        "train.gradient_checkpointing=true",
        output_dir=tmp_path / method,
    )
    record = run(cfg)
    assert record.status == "completed" and record.precision == "bf16" and "cuda" in record.device
    assert (
        record.metrics["peak_cuda_allocated_mb"] > 0
        and record.metrics["peak_memory_mb"] == record.metrics["peak_cuda_allocated_mb"]
    )
    assert math.isfinite(record.metrics["best_val_loss"]) and record.generations
