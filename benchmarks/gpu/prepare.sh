#!/usr/bin/env bash
# Run HERE (PyPI reachable), before benchmarks/gpu/run.sh goes to a GPU machine that reaches nothing.
#
#   bash benchmarks/gpu/prepare.sh            # -> benchmarks/gpu/carry/ (ignored by git; carry it along)
#
# It fetches, as wheels with --no-deps, exactly the versions installed in this environment of what a bare
# GPU machine (torch with CUDA, transformers, numpy, pandas, ...: /work/.library/device/KINDS.md) lacks or
# has in another version, for its Python (3.12 on the lent H200s, not this machine's 3.11: override with
# PY=3.11), and copies the SmolLM2 tokenizer and config (no weights: the GPU run builds random-initialised
# models of the same shape with from_config, so nothing of ~540 MB needs to travel).
set -euo pipefail
cd "$(dirname "$0")/../.."
CARRY=benchmarks/gpu/carry
PY=${PY:-3.12}
mkdir -p "$CARRY/wheels" "$CARRY/smollm2"

# What lora_sweep imports that the GPU image lacks, and their own needs (the closure of their requirements
# minus the image's packages). Left out on purpose: MLflow's server and model-serving extras (docker,
# gunicorn, huey, skops, prettytable, graphene) and the full `mlflow` wheel, whose only addition to
# mlflow-skinny's Python package is the UI's JavaScript (7 of its 12 MB): a run only writes to a sqlite store.
NAMES=(
  hydra-core omegaconf antlr4-python3-runtime hydra-joblib-launcher
  optuna alembic sqlalchemy colorlog cmaes
  mlflow-skinny mlflow-tracing cachetools databricks-sdk google-auth pyasn1 pyasn1-modules
  fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection python-dotenv
  gitpython gitdb smmap importlib-metadata sqlparse flask flask-cors itsdangerous blinker
  opentelemetry-api opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions
  cryptography cffi pycparser
  transformers peft datasets dill multiprocess gguf bitsandbytes nvidia-ml-py chatterbot-corpus
)
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)

rm -f "$CARRY"/wheels/*.whl
for name in "${NAMES[@]}"; do
  if ! version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null)
  then
    echo "skipped $name: not installed here (the GPU image has nvidia-ml-py)"
    continue
  fi
  if ! python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
      "${PLATFORMS[@]}" -d "$CARRY/wheels" "$name==$version" 2>/dev/null; then
    # no wheel on PyPI (antlr4-python3-runtime 4.9.3 ships an sdist only): build the pure-Python wheel here
    python -m pip wheel -q --no-deps -w "$CARRY/wheels" "$name==$version"
  fi
done

# SmolLM2's tokenizer (with its chat template) and config, from the checkpoint lora_sweep converts its GGUF to
PYTHONPATH=$PWD python - "$CARRY/smollm2" <<'PY'
import shutil, sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from lora_sweep import cli
from lora_sweep.models import model_source

cli.register_resolvers()
with initialize_config_dir(config_dir=str(cli.CONF_DIR), version_base="1.3"):
    cfg = cli.to_run_config(compose(config_name="config", overrides=["model=smollm2_135m", "data=chatterbot", "output_dir=/tmp"]))
source = Path(model_source(cfg.model))
for file in source.iterdir():
    if file.is_file() and not file.name.endswith((".safetensors", ".bin", ".gguf")):
        shutil.copy(file, sys.argv[1])
PY

# bitsandbytes ships one library per CUDA and ROCm release (42 MB): install it here into carry/bnb and keep
# the CPU library and CUDA 13's (the image's torch is cu130), so it fits the 64 MiB a device call carries
rm -rf "$CARRY/bnb"
python -m pip install -q --no-deps --no-compile --target "$CARRY/bnb" "$CARRY"/wheels/bitsandbytes-*.whl
find "$CARRY/bnb/bitsandbytes" -name 'libbitsandbytes_*' ! -name '*cuda13*' ! -name '*cpu*' -delete
rm "$CARRY"/wheels/bitsandbytes-*.whl
ls "$CARRY/bnb/bitsandbytes" | grep libbitsandbytes >"$CARRY/bnb.txt"

ls "$CARRY/wheels" | sort > "$CARRY/wheels.txt"
echo "$(ls "$CARRY"/wheels/*.whl | wc -l) wheels, $(du -sh "$CARRY" | cut -f1) in $CARRY (carry it: under 64 MiB)"
