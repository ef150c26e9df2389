"""Causal-LM evaluation: validation loss and perplexity over the trained tokens, greedy generations for a
person to read, and perplexity on out-of-task reference text (how much the model forgot).

Perplexity is exp of the mean negative log-likelihood per predicted token over the whole split (token
weighted, not a mean of per-batch means): batches with many answer tokens count for more.
"""

from __future__ import annotations

import math

import torch

from lora_sweep.data import PACKED_TOKENS
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


class PackingCollator:
    """Padding-free batches of instruction rows: the same rows as a padded batch, concatenated into as few
    rows as fit ``budget`` tokens each (first fit, longest first; ``None``: all into one row, what flash
    attention's varlen path needs). Position ids restart at 0 for every sequence; with no attention mask,
    transformers builds the causal mask from them so that no token attends to another sequence (sdpa, eager;
    flash attention takes the sequence boundaries from them). The first label of every sequence is -100, so
    no sequence is predicted from the one before. Shorter rows are filled with pad tokens that form a
    sequence of their own (labels -100). The loss is the same token mean as over the padded batch."""

    def __init__(self, pad_token_id: int, budget: int | None, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.budget = budget
        self.pad_to_multiple_of = pad_to_multiple_of

    def bins(self, lengths: list[int]) -> list[list[int]]:
        if self.budget is None:
            return [list(range(len(lengths)))]
        bins: list[list[int]] = []
        room: list[int] = []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fit = next((b for b, free in enumerate(room) if free >= lengths[index]), None)
            if fit is None:  # a row longer than the budget gets a row of its own
                bins.append([index])
                room.append(self.budget - lengths[index])
            else:
                bins[fit].append(index)
                room[fit] -= lengths[index]
        return bins

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        rows = []
        for members in self.bins([len(i) for i in ids]):
            row_ids, row_labels, positions = [], [], []
            for index in members:
                row_ids += ids[index]
                row_labels += [IGNORE, *labels[index][1:]]
                positions += range(len(ids[index]))
            rows.append((row_ids, row_labels, positions))
        width = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for row_ids, row_labels, positions in rows:
            fill = width - len(row_ids)
            batch["input_ids"].append(row_ids + [self.pad_token_id] * fill)
            batch["labels"].append(row_labels + [IGNORE] * fill)
            batch["position_ids"].append(list(positions) + list(range(fill)))
        tensors = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        tensors[PACKED_TOKENS] = torch.tensor(sum(len(i) for i in ids))
        return tensors


def packs_separately(model, device) -> bool:
    """Whether ``model`` keeps packed sequences apart: the logits of a sequence packed after another must
    equal its logits alone (a model whose attention ignores packed position ids would mix them, and so
    does transformers' masking whenever the forward pass makes a KV cache: ``config.use_cache``)."""
    first, second = [3, 4, 5, 6], [7, 8, 9]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([first + second], device=device),
            position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device),
        ).logits[0, len(first) :]
        alone = model(input_ids=torch.tensor([second], device=device)).logits[0]
    model.train(was_training)
    scale = float(alone.float().abs().max().clamp(min=1.0))
    tolerance = 1e-4 if alone.dtype == torch.float32 else 3e-2  # bf16/fp16 kernels round differently
    return float((packed.float() - alone.float()).abs().max()) <= tolerance * scale


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
    model,
    loader,
    device: torch.device,
    precision: str,
    num_labels: int = 0,
    desc: str = "eval",
    per_row: bool = False,
) -> dict:
    """Loss (mean NLL per predicted token) and perplexity over every batch of ``loader``.
    ``num_labels`` is unused: the signature matches the classifier's evaluate. ``per_row``: also each row's
    mean NLL (``row_losses``), in the dataset's order whatever order the loader batched the rows in."""
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), device=device, dtype=torch.float64)
    tokens = torch.zeros((), device=device, dtype=torch.int64)
    rows = 0
    row_losses = []
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
            if per_row:
                row_losses += [float(n / max(int(c), 1)) for n, c in zip(*row_nll(logits, labels))]
            bar.update()
    model.train(was_training)
    loss = float(nll_sum.item() / max(int(tokens.item()), 1))
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "samples": rows}
    if per_row:
        from lora_sweep.data import in_dataset_order

        metrics["row_losses"] = in_dataset_order(row_losses, loader)
    return metrics


def row_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of negative log-likelihoods, number of predicted tokens)."""
    shifted_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1, :].float().transpose(1, 2), shifted_labels, ignore_index=IGNORE, reduction="none"
    )
    return nll.double().sum(dim=1), (shifted_labels != IGNORE).sum(dim=1)


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
    loader = make_loader(rows, lm_collator(tokenizer), batch_size, shuffle=False, sort_by_length=True)
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
