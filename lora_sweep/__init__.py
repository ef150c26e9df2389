"""lora_sweep: sweep LoRA rank, alpha and target modules against full fine-tuning, tracked in MLflow."""

import os

# Quiet, network-free defaults that a user can still override from the environment. MLflow otherwise
# resolves a telemetry host in a background thread, and datasets pings the hub to count downloads even
# for local files; neither must slow or break an offline run.
for _name, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"
