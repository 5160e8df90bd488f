"""Reading back what the real tracking libraries wrote, offline / locally: an MLflow store
(through mlflow's own client) and a W&B offline run (its ``run-<id>.wandb`` file). The
fixtures that set them up (``mlflow_uri``, ``wandb_offline``) are in ``conftest.py``."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def mlflow_runs(uri: str, experiment: str) -> list:
    """The runs of ``experiment`` in the store at ``uri``, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)


def mlflow_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    history = mlflow.MlflowClient(uri).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log blocks of 32 KiB holding (crc32, length, type) + data chunks (type 1 a
    whole record; 2, 3, 4 its first, middle and last parts)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # the block's zero padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_runs(folder: Path, wait_s: float = 30.0) -> list[dict]:
    """Each offline run under ``folder``: ``project``, ``name``, ``tags``, ``config`` (the
    run's, updates included), ``history`` (one dict a step: ``_step`` and the logged values)
    and ``finished`` (its exit record is there). W&B's writer process may still be writing a
    finished run's file when ``wandb.finish()`` returns: read again until every run has
    finished, for ``wait_s`` at most."""
    deadline = time.monotonic() + wait_s
    while True:
        runs = _read_runs(folder)
        if all(run["finished"] for run in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.1)


def _read_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        run = {"config": {}, "history": [], "finished": False}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(project=record.run.project, name=record.run.display_name,
                           tags=list(record.run.tags))
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "exit":
                run["finished"] = True
        runs.append(run)
    return runs
