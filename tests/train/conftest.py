"""Fixtures for the tracking libraries, used offline / locally (see ``trackers.py``)."""

import pytest


@pytest.fixture
def mlflow_uri(tmp_path):
    """A local MLflow tracking store in ``tmp_path`` (SQLite: MLflow 3 refuses new file
    stores); the process-wide tracking URI is reset afterwards."""
    mlflow = pytest.importorskip("mlflow")
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    if mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B in offline mode writing under ``tmp_path / "wandb"`` (returned), quietly. W&B reads
    its settings once a process (``wandb.setup``): torn down after the test, so that the next
    one reads its own ``WANDB_DIR``."""
    wandb = pytest.importorskip("wandb")
    folder = tmp_path / "wandb"
    folder.mkdir()
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    wandb.teardown()
    yield folder
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()
