"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence"):
singular vectors of a fine-tuned weight matrix that look like none of the pre-trained matrix's.

For a pre-trained matrix W0 and its fine-tuned W (an adapter's: merged, W0 + ΔW), take the top ``k`` left
singular vectors of W (by singular value) and, for each, its largest absolute cosine similarity with *every*
left singular vector of W0 (absolute: a singular vector's sign is arbitrary). It is an intruder dimension
when that largest similarity is below ``eps``. The paper finds LoRA makes such high-ranking new directions and
full fine-tuning does not, and ties them to forgetting. The defaults, ``k`` = 10 and ``eps`` = 0.5, are our
choice, not a setting taken from the paper; both are arguments.

What a count means: W0's left singular vectors span its whole column space, so no direction lies outside
them; an intruder is a direction aligned with no *single* pre-trained singular vector. A random unit vector
in n dimensions has a largest |cosine| of about sqrt(2 ln(2n) / n) with n orthonormal vectors (0.19 at
MiniLM's 384), so at ``eps`` = 0.5 a fresh direction counts and a slightly rotated old one does not. Kept to
the top of the spectrum (small ``k``), where pre-trained singular values are well separated; deep in the
bulk near-equal singular values let a small update mix their vectors and a count there means little.

Both sides are measured on the same matrices: the linear layers the chosen adapter adapts. SVDs run in
float32 on CPU, on one thread; the pre-trained side is decomposed once for both. At MiniLM's size (all_linear:
36 matrices of 384 x 384, 1536 x 384 or 384 x 1536) one set of SVDs took 6 s on 2 CPU cores busy with other
jobs: about 20 s for the base, the adapter and full fine-tuning.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch

DEFAULT_K = 10
DEFAULT_EPS = 0.5


@contextmanager
def _one_thread():
    """LAPACK on one thread: on 2 busy cores a 384 x 384 float32 SVD took 2.5 s on torch's 2 threads and
    0.11 s on one (the threads wait for each other); matrices this small gain little from a second one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _left_singular_vectors(weight: torch.Tensor) -> torch.Tensor:
    """Columns: the left singular vectors of ``weight``, by decreasing singular value. float32: the cosines
    are compared with a threshold of about 0.5, far above its rounding."""
    with _one_thread():
        return torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False).U


def left_singular_vectors(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every left singular vector of each named (out, in) weight: the pre-trained side, computed once for
    several fine-tuned models of one base."""
    return {name: _left_singular_vectors(state[name]) for name in names}


def top_similarities(w0: torch.Tensor, w: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:
    """For each of the top ``k`` left singular vectors of ``w``: its largest |cosine| with any left singular
    vector of ``w0`` (both (out, in) matrices of one shape)."""
    return _similarities(_left_singular_vectors(w0), w, k)


def _similarities(base: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    if base.shape[0] != w.shape[0]:
        raise ValueError(f"output sizes differ: {base.shape[0]} vs {w.shape[0]}")
    tuned = _left_singular_vectors(w)[:, :k]
    return (base.T @ tuned).abs().max(dim=0).values  # singular vectors have unit norm: a dot is a cosine


def module_kind(name: str) -> str:
    """What a module is, the same in every layer: its role (q, k, v, o, up, down, ...,
    :func:`lora_sweep.targets.module_role`), else its path inside the layer (``pooler.dense`` outside any)."""
    from lora_sweep.targets import module_role

    role = module_role(name)
    if role:
        return role
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numbered[-1] + 1 :] if numbered else parts[-2:])


def intruder_dimensions(
    base_state: Mapping[str, torch.Tensor],
    tuned_state: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any]:
    """Intruder dimensions of ``tuned_state`` against ``base_state``: both map a name to a 2-D weight in
    ``nn.Linear``'s (out, in) orientation; ``names`` are the ones compared (default: every name in both).

    Returns ``total`` (intruders over all matrices), ``by_module`` (summed per :func:`module_kind`),
    ``matrices`` (how many were compared) and ``per_matrix`` (name: count)."""
    _check(k, eps)
    names = [n for n in base_state if n in tuned_state] if names is None else list(names)
    return _intruders(left_singular_vectors(base_state, names), tuned_state, names, k, eps)


def _check(k: int, eps: float) -> None:
    if k < 1 or not 0 < eps <= 1:
        raise ValueError(f"need k >= 1 and 0 < eps <= 1, got k={k}, eps={eps}")


def _intruders(
    base_vectors: Mapping[str, torch.Tensor],
    tuned_state: Mapping[str, torch.Tensor],
    names: list[str],
    k: int,
    eps: float,
) -> dict[str, Any]:
    per_matrix = {
        name: int((_similarities(base_vectors[name], tuned_state[name], k) < eps).sum()) for name in names
    }
    by_module: dict[str, int] = {}
    for name, count in per_matrix.items():
        by_module[module_kind(name)] = by_module.get(module_kind(name), 0) + count
    return {
        "total": sum(per_matrix.values()),
        "by_module": by_module,
        "matrices": len(per_matrix),
        "per_matrix": per_matrix,
    }


def _is_linear(module) -> bool:
    """A layer the measure applies to (an adapted embedding or convolution is left out)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_weight(module) -> torch.Tensor:
    """The layer's weight as (out, in): transformers' Conv1D (GPT-2) stores it transposed."""
    weight = module.weight
    if type(module).__name__ == "Conv1D":
        weight = weight.T
    return weight.detach().to(torch.float32).clone()


def _weights(model, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {name: _linear_weight(model.get_submodule(name)) for name in names}


def _merged_adapter(record: dict[str, Any]):
    """(the adapter's base layer names, their pristine weights, the merged model), or a reason it has none.
    Loaded as the report's export loads it: over a quantized base dequantized first, so the update is not
    rounded into 4-bit weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_sweep.methods import is_mergeable, load_adapter
    from lora_sweep.report import checkpoints as ck
    from lora_sweep.weights import require_safetensors

    if record["config"]["model"].get("quantization", "none") != "none":
        checkpoint = require_safetensors(record["checkpoints"]["best"])
        _, _, base = ck._setup(record)
        model = load_adapter(base.dequantize(dtype=ck.MERGED_DTYPE), checkpoint)
    else:
        _, _, model = ck.load_trained(record)
    if not is_mergeable(model):
        return f"the {record['config']['method']['name']} adapter does not merge into the weights"
    names = [
        name
        for name, module in model.get_base_model().named_modules()
        if isinstance(module, BaseTunerLayer) and _is_linear(module.get_base_layer())
    ]
    if not names:
        return "the adapter adapts no linear layer"
    base = {
        name: _linear_weight(model.get_base_model().get_submodule(name).get_base_layer()) for name in names
    }
    return names, base, model.merge_and_unload()


def checkpoint_intruders(
    record_lora: dict[str, Any],
    record_full: dict[str, Any],
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
) -> dict[str, Any] | str:
    """Intruder dimensions of the chosen adapter's checkpoint (merged over the pristine base) and of the
    full fine-tuning checkpoint, on the same matrices: the ones the adapter adapts. A string says why not
    (an adapter that does not merge, a run that is not an adapter)."""
    from lora_sweep.report import checkpoints as ck

    _check(k, eps)
    if record_lora["config"]["method"].get("peft") is None:
        return "not measured: the chosen run is not an adapter"
    found = _merged_adapter(record_lora)
    if isinstance(found, str):
        return f"not measured: {found}"
    names, base, merged = found
    base_vectors = left_singular_vectors(base, names)
    lora = _intruders(base_vectors, _weights(merged, names), names, k, eps)
    del merged
    _, _, full_model = ck.load_trained(record_full)
    same_base = json.dumps(record_full["config"]["model"], sort_keys=True) == json.dumps(
        record_lora["config"]["model"], sort_keys=True
    )
    if not same_base:  # compare each model with its own pre-trained weights
        _, _, pristine = ck._setup(record_full)
        base_vectors = left_singular_vectors(_weights(pristine, names), names)
    full = _intruders(base_vectors, _weights(full_model, names), names, k, eps)
    return {
        "lora": lora,
        "full": full,
        "k": k,
        "eps": eps,
        "note": (
            f"Intruder dimensions (Shuttleworth et al. 2024): of the top {k} left singular vectors of each "
            f"of the {len(names)} weight matrices the chosen adapter changes, those whose largest |cosine| "
            f"with every singular vector of the pre-trained matrix is below {eps:g}; full fine-tuning on the "
            "same matrices."
        ),
    }
