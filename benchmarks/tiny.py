"""The tiny model and data the benchmarks' ``--tiny`` modes run on: a random BERT (hidden size 32) with a
word-level vocabulary and a sentiment csv its words decide, as tests/conftest.py builds them for the suite
(the benchmarks do not import the tests)."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = {
    "positive": ["good", "great", "fine", "lovely", "superb", "fun", "moving", "smart", "warm", "best"],
    "negative": ["bad", "awful", "dull", "boring", "weak", "poor", "messy", "flat", "cold", "worst"],
    "neutral": ["the", "a", "movie", "film", "plot", "cast", "was", "is", "very", "quite", "and", "story"],
}


def build_tiny_model(folder: Path) -> Path:
    """A random BERT with hidden size 32 and a word-level vocabulary, as tests/conftest.py builds it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if (folder / "config.json").exists():
        return folder
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(w for words in WORDS.values() for w in words)]
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
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(folder)
    return folder


def build_tiny_data(path: Path) -> Path:
    """480 sentences whose label their sentiment words decide (tests/helpers.py's sentiment_rows)."""
    import csv

    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(480):
            label = "positive" if i % 2 == 0 else "negative"
            words = rng.sample(WORDS["neutral"], 4) + rng.sample(WORDS[label], 2)
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path
