"""Which checkpoint to ship, by a rule stated in words, and how each LoRA trial compares with full FT.

The rule itself lives in :mod:`lora_sweep.sweep.trials`: the sweep applies it too (keep_checkpoints, the
replicates of the chosen trial), so both always agree."""

from lora_sweep.sweep.trials import DEFAULT_TOLERANCE, Choice, pick_best, with_comparisons

__all__ = ["DEFAULT_TOLERANCE", "Choice", "pick_best", "with_comparisons"]
