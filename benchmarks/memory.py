"""Peak host memory (RSS) of a 3-trial LoRA sweep on a ~0.5B-parameter Llama, before and after lean reuse.

    python benchmarks/memory.py                          # this checkout vs 8440ff5, fp32 and bf16 bases
    python benchmarks/memory.py --dtypes fp32             # the README's figures
    python benchmarks/memory.py --baseline-ref none      # this checkout only

The model is random-initialised from a ``LlamaConfig`` (hidden 1024, 32 layers, MLP 2816, 16 heads, untied
49,152-token embeddings: 0.51B parameters, 2.0 GB in fp32), saved once into ``--workdir`` with
``save_pretrained`` next to SmolLM2's tokenizer (from the converted checkpoint under
``~/.cache/lora_sweep/models``, which a first ``python -m lora_sweep model=smollm2_135m data=chatterbot``
makes). Each configuration is one ``python -m lora_sweep --multirun sweeps=causal_quick`` (ChatterBot
instruction data, offline) cut down to three LoRA trials of ``--steps`` steps, no baseline, no report, no
forgetting or generation passes: what remains is loading the base, the trials and the reuse between them.
It runs in its own process under a small wrapper that reads the kernel's high-water mark of the sweep
process (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: exact, no sampling).

The code before (``--baseline-ref``) runs from a ``git worktree`` of that commit with ``PYTHONPATH`` pointing
at it. The bf16 rows need ``model.dtype`` (added by the quantization work); a checkout without that key
gets its bf16 row skipped, with the reason printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LORA_SWEEP_CACHE", "~/.cache/lora_sweep")).expanduser()
SHAPE = {
    "hidden_size": 1024,
    "num_hidden_layers": 32,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# runs the sweep as its only child and prints that child's peak RSS (ru_maxrss is in KiB on Linux)
WRAPPER = (
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def tokenizer_folder() -> Path:
    found = sorted((CACHE / "models").glob("SmolLM2-*/tokenizer.json"))
    if not found:
        sys.exit(
            f"error: no SmolLM2 tokenizer under {CACHE / 'models'}: run "
            "`python -m lora_sweep model=smollm2_135m data=chatterbot train.max_steps=1` once to convert it"
        )
    return found[0].parent


def build_model(folder: Path) -> int:
    """The random Llama in ``folder`` (made once); returns its parameter count."""
    marker = folder / "parameters.json"
    if marker.is_file():
        return json.loads(marker.read_text())["parameters"]
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = tokenizer_folder()
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPE,
    )
    started = time.perf_counter()
    model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (source / extra).is_file() and not (folder / extra).is_file():
            shutil.copy(source / extra, folder / extra)
    print(f"built {parameters / 1e9:.2f}B parameters in {time.perf_counter() - started:.0f} s: {folder}")
    marker.write_text(json.dumps({"parameters": parameters}))
    return parameters


def checkout(ref: str, workdir: Path) -> Path:
    """A detached worktree of ``ref`` (kept in the workdir for the next run)."""
    commit = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short", ref], text=True).strip()
    tree = workdir / f"tree-{commit}"
    if not tree.is_dir():
        subprocess.check_call(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit])
    return tree


def has_dtype_key(tree: Path) -> bool:
    probe = "from lora_sweep.config import ModelConfig; print('dtype' in ModelConfig.__dataclass_fields__)"
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def sweep_command(model: Path, study: str, workdir: Path, steps: int, dtype: str | None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lora_sweep",
        "--multirun",
        "sweeps=causal_quick",
        "model=local",
        f"model.name_or_path={model}",
        *([f"model.dtype={dtype}"] if dtype else []),
        "tracking=none",
        f"train.max_steps={steps}",
        f"train.eval_every={steps}",
        f"train.log_every={steps}",
        "train.batch_size=2",
        "train.eval_batch_size=4",
        "train.max_length=48",
        "train.device=cpu",
        "data.max_eval_samples=4",
        "evaluate_test=false",
        "lm_eval.reference_texts=0",
        "lm_eval.num_prompts=0",
        "data.prompts=[]",  # chatterbot's own generation prompts: minutes of decoding, nothing for memory
        f"data.cache_dir={workdir / 'data_cache'}",
        f"hydra.sweeper.study_name={study}",
        f"hydra.sweep.dir={workdir / 'sweeps' / study}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.baseline.n_trials=0",
        "hydra.sweeper.report.enabled=false",
    ]


def measure(tree: Path, command: list[str], workdir: Path, log: Path) -> tuple[float, float]:
    """(peak RSS MiB, seconds) of one sweep; exits with its log's tail when it fails."""
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(
            [sys.executable, "-c", WRAPPER, *command],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seconds = time.perf_counter() - started
    text = log.read_text()
    peak = [line.split()[1] for line in text.splitlines() if line.startswith("PEAK_RSS_KIB")]
    if code != 0 or not peak:
        tail = "\n".join(text.splitlines()[-20:])
        sys.exit(f"error: the sweep failed (exit {code}); {log}:\n{tail}")
    return int(peak[-1]) / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp folder")
    parser.add_argument("--baseline-ref", default="8440ff5", help="the code before; 'none' to skip it")
    parser.add_argument("--dtypes", default="fp32,bf16", help="base dtypes to measure (model.dtype)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per trial")
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lora_sweep_memory_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "llama-0.5b"
    parameters = build_model(model)
    trees = {"after": REPO}
    if args.baseline_ref != "none":
        trees = {"before": checkout(args.baseline_ref, workdir), **trees}

    rows = []
    for dtype in args.dtypes.split(","):
        for label, tree in trees.items():
            name = f"{label} ({tree.name if label == 'before' else 'this checkout'}), {dtype} base"
            if dtype != "fp32" and not has_dtype_key(tree):
                print(f"skipped: {name}: this code has no model.dtype key (the quantization work adds it)")
                continue
            study = f"memory_{label}_{dtype}"
            shutil.rmtree(workdir / "sweeps" / study, ignore_errors=True)  # a fresh study, not a resume
            command = sweep_command(model, study, workdir, args.steps, None if dtype == "fp32" else dtype)
            peak, seconds = measure(tree, command, workdir, workdir / f"{study}.log")
            print(f"{name}: peak RSS {peak:,.0f} MiB, {seconds:.0f} s")
            rows.append(
                {"config": name, "label": label, "dtype": dtype, "peak_mib": peak, "seconds": seconds}
            )

    reference = next(
        (r for r in rows if r["label"] == "before" and r["dtype"] == "fp32"), rows[0] if rows else None
    )
    print(f"\n3-trial LoRA sweep, {parameters / 1e9:.2f}B-parameter Llama, {args.steps} steps per trial, CPU")
    print(f"| config | peak RSS (MiB) | vs {reference['config'] if reference else '-'} | time (s) |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['peak_mib']:,.0f} | {row['peak_mib'] / reference['peak_mib']:.2f}x "
            f"| {row['seconds']:.0f} |"
        )
    (workdir / "memory.json").write_text(json.dumps({"parameters": parameters, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
