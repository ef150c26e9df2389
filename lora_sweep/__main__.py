"""``python -m lora_sweep [overrides]``: one fine-tune; ``--multirun`` for a sweep."""

import sys

import hydra

from lora_sweep import cli
from lora_sweep.secrets import install_log_redaction

cli.register_resolvers()
install_log_redaction()  # before Hydra logs the first override


@hydra.main(version_base="1.3", config_path=str(cli.CONF_DIR), config_name="config")
def _hydra_main(cfg) -> float:
    return cli.main(cfg)


def main() -> float:
    """A command line Hydra cannot compose (a typo'd key, a bad type, an unknown option) is one line and
    exit code 2, as every other bad value is, instead of Hydra's report of 5-7 lines."""
    from lora_sweep.hydra_api import command_line_error

    problem = command_line_error(sys.argv[1:], str(cli.CONF_DIR), "config")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    return _hydra_main()


if __name__ == "__main__":
    main()
