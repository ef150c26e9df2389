"""Optuna sweeps behind a Hydra sweeper: search space, study, trial bridge, loop, results, summary."""
