"""Experiment tracking behind one small interface. Only this module imports mlflow.

The training loop calls :class:`Tracker` methods; ``tracking=none`` gives the no-op base class, and
``tracking=mlflow`` records to any MLflow tracking URI (default: MLflow's own, ``sqlite:///mlflow.db``
in the working directory, so a plain ``mlflow ui`` there shows the run).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lora_sweep.config import TrackingConfig
from lora_sweep.errors import ConfigError
from lora_sweep.secrets import redact, redact_url

log = logging.getLogger(__name__)
MLFLOW_PARAM_LIMIT = 6000  # characters per param value in MLflow 3
# MLflow's own client retries a refused connection for minutes (253 s measured) before it gives up
PROBE_TIMEOUT_S = 5.0


def probe_tracking_server(uri: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One bounded request to an ``http(s)://`` tracking server, no retries: a ConfigError naming
    ``tracking.tracking_uri`` when nothing answers. Any HTTP answer passes (a proxy in front of MLflow may
    not route ``/health``, a server may want credentials): MLflow's own requests then say what is wrong.
    Local stores (sqlite, files) and other schemes are not probed."""
    import urllib.error
    import urllib.parse
    import urllib.request

    if not uri:
        return
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    # credentials in the URI are no business of the probe (urllib cannot parse them either)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    url = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:  # it answered
        return
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        problem = str(reason).splitlines()[0] if str(reason) else type(reason).__name__
        raise ConfigError(
            "tracking.tracking_uri",
            redact_url(uri),
            f"MLflow server unreachable: {problem} (one request to {redact_url(url)}, {timeout:g} s timeout)",
        ) from None


class Tracker:
    """Does nothing: what ``tracking=none`` uses, and the interface every tracker implements."""

    run_id: str | None = None
    location: str | None = None

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        resume_run_id: str | None = None,
        identity: tuple[str, ...] = (),
    ) -> None:
        """Open the run; with ``resume_run_id``, continue that run (an interrupted attempt of this one); else
        continue the run whose ``identity`` tags (keys of ``tags``) all match, if there is one: an attempt
        killed after creating its run but before it could write the run's id down."""

    def close_run(self, run_id: str | None, status: str) -> None:
        """End a run an earlier process left open (it finished its work but died before saying so)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, local_dir: Path, artifact_path: str, skip: tuple[str, ...] = ()) -> None: ...

    def log_dict(self, data: dict, filename: str) -> None:
        """Store ``data`` as a JSON or YAML artifact (chosen by the file name)."""

    def log_table(self, rows: list[dict[str, Any]], filename: str) -> None:
        """Store rows of the same keys as a table artifact (e.g. prompts and generated answers)."""

    def end(self, status: str) -> None:
        """status: completed, failed, pruned or killed."""


class MLflowTracker(Tracker):
    # MLflow has no "pruned" status: a pruned trial ends KILLED (stopped early on purpose), tagged pruned
    _STATUS = {"completed": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "killed": "KILLED"}

    def __init__(self, cfg: TrackingConfig):
        import mlflow

        self.cfg = cfg
        self._mlflow = mlflow
        if cfg.tracking_uri:
            mlflow.set_tracking_uri(cfg.tracking_uri)
        self.location = mlflow.get_tracking_uri()
        self._run = None
        # a continued run: per metric, the last step the earlier attempt logged (the steps it redoes after
        # its last checkpoint are not logged twice)
        self._logged_through: dict[str, int] = {}

    def start(
        self,
        run_name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        resume_run_id: str | None = None,
        identity: tuple[str, ...] = (),
    ) -> None:
        mlflow = self._mlflow
        probe_tracking_server(self.location)
        experiment = _use_experiment(self.cfg, self.location)
        if not resume_run_id and identity:
            resume_run_id = _find_run(
                mlflow.MlflowClient(), experiment.experiment_id, {key: tags[key] for key in identity}
            )
        if self.cfg.system_metrics:
            # each sample costs the training process CPU (~2.6% of a CPU step at 5 s): the key sets how often
            mlflow.set_system_metrics_sampling_interval(self.cfg.system_metrics_interval)
        logged: dict[str, str] = {}
        self._logged_through = {}
        if resume_run_id:
            try:
                params_before = dict(mlflow.MlflowClient().get_run(resume_run_id).data.params)
                self._logged_through = _last_logged_steps(resume_run_id)
                logged = params_before
            except Exception as err:  # deleted, or another store: a new run is better than none
                self._logged_through = {}
                log.warning(
                    "cannot continue MLflow run %s (%s); starting a new one",
                    resume_run_id,
                    str(err).splitlines()[0],
                )
                resume_run_id = None
        if resume_run_id:
            self._run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=self.cfg.system_metrics)
            mlflow.set_tags(redact({**tags, "lora_sweep.resumed": "true"}))
        else:
            self._run = mlflow.start_run(
                run_name=redact(run_name), tags=redact(tags), log_system_metrics=self.cfg.system_metrics
            )
        self.run_id = self._run.info.run_id
        try:  # MLflow params are write-once: a resumed run logs only what the first attempt did not
            mlflow.log_params(
                {key: _param_value(value) for key, value in params.items() if key not in logged}
            )
        except BaseException:  # never leave a half-made run RUNNING
            self.end("failed")
            raise

    def close_run(self, run_id: str | None, status: str) -> None:
        if not run_id:
            return
        client = self._mlflow.MlflowClient()
        try:
            probe_tracking_server(self.location)
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "lora_sweep.status", status)
                client.set_terminated(run_id, status=self._STATUS.get(status, "FINISHED"))
        except Exception as err:  # noqa: BLE001 - a missing run is nothing to close
            log.warning("cannot close MLflow run %s: %s", run_id, str(err).splitlines()[0])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        finite = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._logged_through:  # MLflow logs step None at step 0
            finite = {k: v for k, v in finite.items() if (step or 0) > self._logged_through.get(k, -1)}
        if finite:
            self._mlflow.log_metrics(finite, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(redact({k: str(v) for k, v in tags.items()}))

    def log_artifacts(self, local_dir: Path, artifact_path: str, skip: tuple[str, ...] = ()) -> None:
        for file in sorted(Path(local_dir).rglob("*")):
            if file.is_file() and file.name not in skip:
                relative = file.parent.relative_to(local_dir).as_posix()
                self._mlflow.log_artifact(
                    str(file), artifact_path if relative == "." else f"{artifact_path}/{relative}"
                )

    def log_dict(self, data: dict, filename: str) -> None:
        self._mlflow.log_dict(
            redact(json.loads(json.dumps(data, default=str))), filename
        )  # .json or .yaml by name

    def log_table(self, rows: list[dict[str, Any]], filename: str) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        # MLflow's table artifact: the run's Artifacts tab shows it as a table, mlflow.load_table reads it
        # back
        self._mlflow.log_table(
            {c: [str(row.get(c, "")) for row in rows] for c in columns}, artifact_file=filename
        )

    def end(self, status: str) -> None:
        if self._run is not None:
            self._mlflow.set_tag("lora_sweep.status", status)
            self._mlflow.end_run(status=self._STATUS.get(status, "FINISHED"))
            self._run = None


def _last_logged_steps(run_id: str) -> dict[str, int]:
    """Per metric of run ``run_id``, the highest step logged (one history read per metric, once per
    resume)."""
    import mlflow

    client = mlflow.MlflowClient()
    keys = client.get_run(run_id).data.metrics
    return {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1) for key in keys}


def _use_experiment(cfg: TrackingConfig, location: str | None):
    """Make ``cfg.experiment`` the active experiment (created if new) and return it."""
    import mlflow

    try:
        experiment = mlflow.set_experiment(cfg.experiment)
    except Exception as err:  # unwritable folder, bad URI scheme, unreachable server
        raise ConfigError(
            "tracking.tracking_uri",
            redact_url(str(location)),
            f"MLflow cannot use this store: {str(err).splitlines()[0]}",
        ) from err
    if "mlflow.experimentKind" not in experiment.tags:
        # MLflow 3's UI opens untyped experiments in its GenAI view; ours is model training
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, "mlflow.experimentKind", "custom_model_development"
        )
    return experiment


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The oldest run of the experiment carrying all of ``tags`` (deleted runs are not searched)."""
    query = " and ".join(f"tags.`{k}` = '{redact(str(v))}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def _param_value(value: Any) -> str:
    text = redact(json.dumps(value) if isinstance(value, (list, dict)) else str(value))
    return text if len(text) <= MLFLOW_PARAM_LIMIT else text[: MLFLOW_PARAM_LIMIT - 3] + "..."


def make_tracker(cfg: TrackingConfig) -> Tracker:
    return MLflowTracker(cfg) if cfg.backend == "mlflow" else Tracker()


class SweepRun:
    """The MLflow parent run of a sweep: one per study, reopened on resume, never duplicated.

    Trials nest under it through the ``mlflow.parentRunId`` tag their own runs carry. ``tracking=none``
    gets this class's no-op behaviour (``run_id`` stays None).
    """

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.run_id: str | None = None
        self.location: str | None = None
        self._client = None
        if cfg.backend == "mlflow":
            import mlflow

            if cfg.tracking_uri:
                mlflow.set_tracking_uri(cfg.tracking_uri)
            self.location = mlflow.get_tracking_uri()
            probe_tracking_server(self.location)
            try:
                self._client = mlflow.MlflowClient()  # opens (creates) the store now
            except Exception as err:
                raise ConfigError(
                    "tracking.tracking_uri",
                    self.location,
                    f"MLflow cannot use this store: {str(err).splitlines()[0]}",
                ) from err

    def open(
        self,
        existing_run_id: str | None,
        name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        identity: tuple[str, ...] = (),
    ) -> str | None:
        """Reopen ``existing_run_id``, else the run whose ``identity`` tags (keys of ``tags``) all match:
        one made by a process killed before it could store the run's id; else create the run."""
        if self._client is None:
            return None
        client = self._client
        if not existing_run_id and identity:
            existing_run_id = self._find({key: tags[key] for key in identity})
        if existing_run_id:
            client.update_run(existing_run_id, status="RUNNING")
            self.run_id = existing_run_id
            run = client.get_run(existing_run_id)
            missing_tags = {k: v for k, v in redact(tags).items() if k not in run.data.tags}
            self.set_tags(missing_tags)
            self._log_params({k: v for k, v in params.items() if k not in run.data.params})
            return existing_run_id
        experiment = _use_experiment(self.cfg, self.location)
        run = client.create_run(experiment.experiment_id, run_name=redact(name), tags=redact(tags))
        self.run_id = run.info.run_id
        self._log_params(params)
        return self.run_id

    def _find(self, tags: dict[str, str]) -> str | None:
        return _find_run(self._client, _use_experiment(self.cfg, self.location).experiment_id, tags)

    def _log_params(self, params: dict[str, Any]) -> None:
        if params:
            from mlflow.entities import Param

            self._client.log_batch(self.run_id, params=[Param(k, _param_value(v)) for k, v in params.items()])

    def log_dict(self, data: dict, filename: str) -> None:
        if self._client is not None and self.run_id:
            self._client.log_dict(self.run_id, redact(json.loads(json.dumps(data, default=str))), filename)

    def log_artifacts(self, local_dir: Path, artifact_path: str) -> None:
        """The files directly in ``local_dir`` (not its sub-folders: exported models stay where they are)."""
        if self._client is not None and self.run_id:
            for file in sorted(Path(local_dir).iterdir()):
                if file.is_file():
                    self._client.log_artifact(self.run_id, str(file), artifact_path)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        if self._client is not None and self.run_id:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._client.log_metric(self.run_id, key, float(value))

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        target = run_id or self.run_id
        if self._client is not None and target:
            for key, value in tags.items():
                self._client.set_tag(target, redact(key), redact(str(value)))

    def finish(self, status: str) -> None:
        if self._client is not None and self.run_id:
            self._client.set_tag(self.run_id, "lora_sweep.status", status)
            self._client.set_terminated(self.run_id, status=MLflowTracker._STATUS.get(status, "FINISHED"))


# --- what the report reads from and writes to MLflow (it never starts a run) ------------------------------
def use_tracking_uri(uri: str | None) -> None:
    """Point MLflow's default store at ``uri`` for this process (None: leave MLflow's default)."""
    if uri:
        import mlflow

        mlflow.set_tracking_uri(uri)


def run_params(run_id: str, tracking_uri: str | None = None) -> dict[str, str]:
    """The params of an existing MLflow run; a LookupError naming the store when it cannot be read."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        return dict(client.get_run(run_id).data.params)
    except Exception as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LookupError(f"no such MLflow run in {redact_url(client.tracking_uri)} ({problem})") from None


def register_model(
    name: str,
    source: str,
    run_id: str | None,
    tags: dict[str, str],
    alias: str,
    tracking_uri: str | None = None,
    description: str = "",
    same_if: tuple[str, ...] = (),
) -> tuple[str, bool]:
    """A new version of registered model ``name`` (created if missing) from ``source``; ``alias`` points at
    it. When the version ``alias`` already points at carries every tag named in ``same_if`` with the value
    ``tags`` gives it, that version is the one asked for: nothing is registered. Returns (the version,
    whether it is new)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except Exception:  # not there yet
        client.create_registered_model(name, description=description)
    if same_if:
        try:
            current = client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001 - no such alias yet
            current = None
        if current is not None and all(current.tags.get(key) == tags.get(key) for key in same_if):
            return str(current.version), False
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version), True
