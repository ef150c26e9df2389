"""Causal-LM evaluation: validation loss and perplexity over the trained tokens, greedy generations for a
person to read, and perplexity on out-of-task reference text (how much the model forgot).

Perplexity is exp of the mean negative log-likelihood per predicted token over the whole split (token
weighted, not a mean of per-batch means): batches with many answer tokens count for more.
"""

from __future__ import annotations

import math

import torch

from lora_sweep.evaluation import autocast, progress
from lora_sweep.lm_data import IGNORE


def lm_collator(tokenizer, pad_to_multiple_of: int | None = None):
    """Pads input_ids with the pad token, attention_mask with 0 and labels with -100 (ignored)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,
        label_pad_token_id=IGNORE,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of negative log-likelihoods, number of predicted tokens): position t predicts label t+1."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return nll, (shifted_labels != IGNORE).sum()


@torch.no_grad()
def evaluate_lm(
    model, loader, device: torch.device, precision: str, num_labels: int = 0, desc: str = "eval"
) -> dict[str, float]:
    """Loss (mean NLL per predicted token) and perplexity over every batch of ``loader``.
    ``num_labels`` is unused: the signature matches the classifier's evaluate."""
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.int64)
    rows = 0
    with progress(len(loader), desc, leave=False) as bar:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            with autocast(device, precision):
                logits = model(**batch).logits
            nll, count = token_nll(logits, labels)
            nll_sum += nll.double()
            tokens += count
            rows += labels.shape[0]
            bar.update()
    model.train(was_training)
    loss = float(nll_sum.item() / max(int(tokens.item()), 1))
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "samples": rows}


def reference_perplexity(
    model, tokenizer, texts: list[str], device: torch.device, precision: str, max_length: int, batch_size: int
) -> float:
    """Perplexity of ``model`` on plain ``texts`` (every token after the first of each text counts)."""
    from lora_sweep.data import make_loader

    rows = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=max_length)
        rows.append(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "labels": list(encoded["input_ids"]),
            }
        )
    loader = make_loader(rows, lm_collator(tokenizer), batch_size, shuffle=False)
    return evaluate_lm(model, loader, device, precision, desc="reference text")["perplexity"]


def prompt_text(tokenizer, prompt, chat: bool, system_prompt: str | None = None) -> str:
    """What the model is given: a chat prompt (a string or a list of messages) rendered with the chat
    template and the assistant's turn opened, or plain text to continue."""
    if not chat:
        return prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list,
    device: torch.device,
    precision: str,
    *,
    chat: bool,
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> list[dict[str, str]]:
    """Greedy continuations, one prompt at a time (no padding to get wrong): [{prompt, response}]."""
    was_training = model.training
    model.eval()
    rows = []
    for prompt in prompts:
        text = prompt_text(tokenizer, prompt, chat, system_prompt)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(device)
        with autocast(device, precision):
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        answer = tokenizer.decode(
            output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
        shown = (
            prompt
            if isinstance(prompt, str)
            else next((m["content"] for m in reversed(prompt) if m["role"] == "user"), text)
        )
        rows.append({"prompt": shown, "response": answer})
    model.train(was_training)
    return rows
