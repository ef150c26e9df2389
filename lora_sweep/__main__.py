"""``python -m lora_sweep [overrides]``: one fine-tune; ``--multirun`` for a sweep."""

import hydra

from lora_sweep import cli

cli.register_resolvers()


@hydra.main(version_base="1.3", config_path=str(cli.CONF_DIR), config_name="config")
def main(cfg) -> float:
    return cli.main(cfg)


if __name__ == "__main__":
    main()
