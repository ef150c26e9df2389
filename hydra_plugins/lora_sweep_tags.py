"""``tags``: an open mapping in every lora_sweep config, so that ``tags.purpose=baseline`` (as
conf/config.yaml documents it) needs no ``+``.

Hydra closes the whole composed config (struct mode) before it applies the command line; a node whose own
struct flag is false stays open. A YAML file cannot set a flag, so the node is registered here (Hydra
imports every plugin module before it composes anything) and conf/config.yaml's defaults list puts it
before its own keys, which merge into it and keep its flag.
"""

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

tags = OmegaConf.create({})
OmegaConf.set_struct(tags, False)
ConfigStore.instance().store(
    name="lora_sweep_tags", node=OmegaConf.create({"tags": tags}), provider="lora_sweep"
)
