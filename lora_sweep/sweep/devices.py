"""How many trials a sweep runs at once, and on which device each of its worker threads trains.

Each worker thread of the sweeper runs one trial at a time (it blocks in the launcher until its trial ends),
so a thread that always trains on the same device puts at most as many trials on that device as it has
threads: worker ``i`` of ``n`` trains on ``cuda:(i mod GPUs)``. The device is given to the trial as a
``train.device=cuda:i`` override, not through ``CUDA_VISIBLE_DEVICES``: a joblib process is reused for
trial after trial, by whichever thread is free, and CUDA reads that variable only once per process.
"""

from __future__ import annotations

from lora_sweep.errors import ConfigError

KEY = "hydra.sweeper.trials_per_device"
SPREAD = ("auto", "cuda")  # train.device values that mean "a GPU", not one named GPU


def plan_workers(
    device: str, gpus: int, trials_per_device: int, n_jobs: int | None, cpus: int
) -> tuple[list[str | None], int | None]:
    """The device override of each worker thread (None: the trial keeps its own ``train.device``) and the
    number of processes the joblib launcher must get (None: as configured).

    ``device`` is ``train.device``, ``gpus`` the number of visible CUDA devices, ``n_jobs`` the joblib
    launcher's setting (None: Hydra's basic launcher, which runs each trial inside the sweeper's process),
    ``cpus`` what joblib's ``n_jobs=-1`` means here.

    ``trials_per_device=1`` keeps what ``n_jobs`` always meant: that many trials at once, spread over the
    GPUs. Above 1 the key decides: GPUs x k trials at once on GPUs (k on the CPU or one named device),
    each in its own joblib process. Hydra's basic launcher cannot do that: trials running at once in one
    process would share its model and data caches.
    """
    k = trials_per_device
    on_gpus = device in SPREAD and gpus > 0
    if k == 1:
        pool = None
        count = 1 if n_jobs is None else (cpus if n_jobs < 0 else max(n_jobs, 1))
    else:
        if n_jobs is None:
            raise ConfigError(
                KEY,
                k,
                "runs trials at once in separate processes: add hydra/launcher=joblib (Hydra's basic "
                "launcher runs them in the sweeper's own process, which holds one model at a time)",
            )
        count = (gpus if on_gpus else 1) * k
        where = f"{gpus} GPUs" if on_gpus and gpus > 1 else "1 device"
        if 0 <= n_jobs < count:
            raise ConfigError(
                "hydra.launcher.n_jobs",
                n_jobs,
                f"fewer processes than the {count} trials {KEY}={k} runs at once on {where}; "
                f"leave n_jobs out (the sweeper sizes the pool) or set it to at least {count}",
            )
        pool = count if n_jobs < 0 else None
    # one GPU: train.device=auto or cuda already names it
    spread = on_gpus and gpus > 1
    return [f"cuda:{i % gpus}" if spread else None for i in range(count)], pool
