"""The MLflow dashboard is part of the product: a real `mlflow server` on 127.0.0.1 over a sweep's store,
opened in a real headless Chromium, shows the sweep's parent run with its trials nested under it."""

from __future__ import annotations

import os
import shutil

import pytest

from . import servers
from .helpers import parents, run_sweep, write_sweep

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def mlflow_server(tmp_path):
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as url:
        yield url


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
)
def test_dashboard_nests_trials_under_the_sweep(tmp_path, tiny, mlflow_server):
    playwright = pytest.importorskip("playwright.sync_api")
    write_sweep(
        tmp_path,
        "ui",
        {
            "n_trials": 2,
            "sampler": {"name": "random", "seed": 0},
            "pruner": {"name": "none"},
            "params": {"train.lr": "tag(log, interval(1e-3, 1e-2))"},
            "baseline": {"n_trials": 1, "params": {"train.lr": "tag(log, interval(1e-4, 1e-3))"}},
        },
    )
    run_sweep(tmp_path, "ui", tiny, "train.epochs=1")
    (parent,) = parents(tmp_path, "ui")

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(f"{mlflow_server}/#/experiments/{parent.info.experiment_id}/runs")
            page.get_by_text("sweep ui").wait_for(timeout=60_000)
            assert page.get_by_text("Training runs").count() >= 1  # opened as model training, not GenAI
            assert page.get_by_text("search-000").count() == 0  # children start folded under their parent
            page.locator("[role=row]", has_text="sweep ui").locator("button").first.click()
            for child in ("search-000", "search-001", "baseline-000"):
                page.get_by_text(child).first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "mlflow_ui.png"))
            shot = os.environ.get("LORA_SWEEP_SCREENSHOT")
            if shot:  # keep the picture for a person to look at
                shutil.copy(tmp_path / "mlflow_ui.png", shot)
        finally:
            browser.close()
