"""Intruder dimensions (lora_sweep/report/intruders.py): on matrices built with a known spectrum, and on a
real PEFT LoRA checkpoint of the tiny BERT against a full fine-tuning one, checked against a merge by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_sweep.report import intruders as intr


def _base(rows: int, cols: int, seed: int = 0):
    """W0 = U diag(s) V^T with well separated singular values 10 .. 1."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    s = torch.linspace(10, 1, cols, dtype=torch.float64)
    return u @ torch.diag(s) @ v.T, u, v


def _count(w0, w, **kw) -> int:
    return intr.intruder_dimensions({"m": w0}, {"m": w}, **kw)["total"]


@pytest.mark.parametrize("shape", [(48, 48), (96, 48)])
def test_an_unchanged_or_slightly_perturbed_matrix_has_no_intruders(shape):
    w0, _, _ = _base(*shape)
    assert _count(w0, w0.clone()) == 0
    noise = 1e-3 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _count(w0, w0 + noise) == 0
    assert _count(w0, w0 + noise, k=48) == 0  # ...even over the whole spectrum, the gaps being wide


@pytest.mark.parametrize("shape", [(48, 48), (96, 48)])
def test_a_large_rank_one_update_off_the_top_directions_is_one_intruder_at_the_top(shape):
    w0, u, v = _base(*shape)
    # spread evenly over the bottom half of W0's singular vectors: |cosine| 1/sqrt(24) = 0.2 with each
    new_left = u[:, 24:].sum(1) / 24**0.5
    new_right = v[:, 24:].sum(1) / 24**0.5
    update = torch.outer(new_left, new_right)

    tuned = w0 + 50 * update  # above W0's top singular value (10): the new direction ranks first
    similarities = intr.top_similarities(w0, tuned)
    assert similarities[0] < 0.25  # about 1/sqrt(24): W0's own bottom half tilts it a little
    assert bool((similarities[1:] > 0.99).all())
    assert _count(w0, tuned) == 1
    assert _count(w0, tuned, eps=0.1) == 0  # the threshold decides: 0.2 is not below 0.1
    assert _count(w0, tuned, k=1) == 1
    assert _count(w0, w0 + 0.5 * update) == 0  # a small update stays out of the top 10: no intruder there


def test_counts_are_summed_by_module_kind():
    w0, u, v = _base(48, 48)
    tuned = w0 + 50 * torch.outer(u[:, 24:].sum(1), v[:, 24:].sum(1)) / 24
    names = [f"bert.encoder.layer.{i}.attention.self.{leaf}" for i in (0, 1) for leaf in ("query", "value")]
    names.append("bert.encoder.layer.0.output.dense")
    base = dict.fromkeys(names, w0)
    found = intr.intruder_dimensions(base, {**base, names[0]: tuned, names[-1]: tuned}, names)
    assert found["total"] == 2 and found["matrices"] == 5
    assert found["by_module"] == {"q": 1, "v": 0, "down": 1}
    assert found["per_matrix"][names[0]] == 1 and found["per_matrix"][names[1]] == 0
    assert intr.module_kind("model.layers.3.mlp.odd_proj") == "mlp.odd_proj"
    with pytest.raises(ValueError, match="eps"):
        intr.intruder_dimensions(base, base, names, eps=0)


@pytest.fixture
def tiny_checkpoints(compose, tiny_overrides, tmp_path):
    """Records of a LoRA (all_linear, r=8, B drawn at random: far from its no-op start) and a full
    fine-tuning checkpoint (every weight nudged by 1e-6 noise) of the tiny BERT, saved with the project's
    checkpoint code."""
    from lora_sweep.checkpoint import save_checkpoint
    from lora_sweep.methods import apply_method
    from lora_sweep.report import checkpoints as ck
    from lora_sweep.schema import to_dict

    def record(cfg, name):
        return {"config": to_dict(cfg), "checkpoints": {"best": str(tmp_path / name / "best")}}

    lora = record(compose(*tiny_overrides, "tracking=none", "method.targets=all_linear"), "lora")
    full = record(compose(*tiny_overrides, "tracking=none", "method=full"), "full")
    cfg, prepared, base = ck._setup(lora)
    full_model = copy.deepcopy(base)
    model = apply_method(base, cfg.method, prepared.spec, prepared.targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    save_checkpoint(lora["checkpoints"]["best"], model, prepared.tokenizer, {"step": 1})
    with torch.no_grad():
        for parameter in full_model.parameters():
            parameter += 1e-6 * torch.randn_like(parameter)
    save_checkpoint(full["checkpoints"]["best"], full_model, prepared.tokenizer, {"step": 1})
    return lora, full


def test_a_merged_lora_checkpoint_against_full_fine_tuning_on_the_same_matrices(
    tiny_checkpoints, tiny_bert_dir
):
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModel

    lora, full = tiny_checkpoints
    found = intr.checkpoint_intruders(lora, full)
    assert found["k"] == intr.DEFAULT_K and found["eps"] == intr.DEFAULT_EPS and found["note"]
    # all_linear on the tiny BERT: 6 linear layers in each of 2 blocks and the pooler; never the head
    assert found["lora"]["matrices"] == found["full"]["matrices"] == 13
    assert found["lora"]["per_matrix"].keys() == found["full"]["per_matrix"].keys()
    assert not any("classifier" in name for name in found["lora"]["per_matrix"])
    assert found["full"]["total"] == 0  # a nudge rotates no top singular vector
    assert found["lora"]["total"] > 0

    # the same count from W0 + (alpha / r) B A, merged here from the adapter file by hand
    folder = Path(lora["checkpoints"]["best"])
    weights = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    encoder = dict(AutoModel.from_pretrained(tiny_bert_dir).named_parameters())
    base, tuned = {}, {}
    for key, a in weights.items():
        if ".lora_A." in key:
            module = key.split("base_model.model.", 1)[1].split(".lora_A.")[0]
            w0 = encoder[module.removeprefix("bert.") + ".weight"].detach()
            base[module], tuned[module] = w0, w0 + scale * weights[key.replace(".lora_A.", ".lora_B.")] @ a
    by_hand = intr.intruder_dimensions(base, tuned)
    assert by_hand["per_matrix"] == found["lora"]["per_matrix"]
    assert found["lora"]["by_module"] == by_hand["by_module"]
    assert set(by_hand["by_module"]) == {"q", "k", "v", "o", "up", "down", "pooler.dense"}

    # a full fine-tuning run is not an adapter: nothing to measure on its own
    assert intr.checkpoint_intruders(full, full) == "not measured: the chosen run is not an adapter"


def test_intruder_lines_render_the_counts_and_nothing_without_them():
    from lora_sweep.report.render import intruder_lines

    assert intruder_lines({}) == []
    summary = {
        "intruders": {
            "lora": {"total": 7, "by_module": {"q": 4, "v": 3}, "matrices": 12},
            "full": {"total": 0, "by_module": {"q": 0, "v": 0}, "matrices": 12},
            "k": 10,
            "eps": 0.5,
            "note": "what it is.",
        }
    }
    text = "\n".join(intruder_lines(summary))
    assert "| matrix type | chosen LoRA | full FT |" in text
    assert "| q | 4 | 0 |" in text and "| v | 3 | 0 |" in text
    assert "| all 12 matrices (top 10 of each: 120) | 7 | 0 |" in text
    assert "what it is." in text
    assert "not measured: x" in "\n".join(intruder_lines({"intruders_note": "not measured: x"}))
