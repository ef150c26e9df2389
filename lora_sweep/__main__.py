"""``python -m lora_sweep [overrides]``: one fine-tune; ``--multirun`` for a sweep."""

import hydra

from lora_sweep import cli
from lora_sweep.secrets import install_log_redaction

cli.register_resolvers()
install_log_redaction()  # before Hydra logs the first override


@hydra.main(version_base="1.3", config_path=str(cli.CONF_DIR), config_name="config")
def main(cfg) -> float:
    return cli.main(cfg)


if __name__ == "__main__":
    main()
