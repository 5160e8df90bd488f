"""`mlx bench kernels` runs every op against plain torch and reports time and memory rows."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from mlx_core.cli.app import build_app
from mlx_kernels import bench


def test_cli_writes_a_row_per_op_and_implementation(tmp_path):
    out = tmp_path / "bench.json"
    done = CliRunner().invoke(build_app(), ["bench", "kernels", "--quick", "--repeats", "1",
                                            "--no-memory", "--json", str(out)])
    assert done.exit_code == 0, done.output
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {c.op for c in bench.CASES}
    assert {r["impl"] for r in rows} == {"mlx", "torch"}
    assert all(r["time_ms"] > 0 for r in rows)


def test_memory_rows_show_the_fused_cross_entropy_saving():
    rows = bench.run(["fused_linear_cross_entropy"], repeats=1, quick=True)
    peak = {r["impl"]: r["peak_mib"] for r in rows}
    assert set(peak) == {"mlx", "torch"} and all(v >= 0 for v in peak.values())


def test_rss_peak_growth_sees_a_large_allocation():
    # in a fresh process, as the benchmark measures: a long-lived one may reuse resident pages
    code = ("import torch; from mlx_kernels.bench import rss_peak_growth_mib; "
            "print(rss_peak_growth_mib(lambda: torch.ones(64 * 2**20 // 4).sum()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 50 < float(done.stdout) < 200


def test_unknown_op_is_named():
    import pytest

    with pytest.raises(ValueError, match="nope"):
        bench.run(["nope"])
