"""``mlx bench jax`` (registered by mlx_jax's plugin): runs in --quick mode on a tiny model,
prints tokens/s and ratios computed from its own timings, and both sides generate the same
greedy tokens."""

import json

from typer.testing import CliRunner

from mlx_core import registry
from mlx_core.cli.app import build_app

runner = CliRunner()


def test_bench_jax_is_registered_by_the_plugin():
    app_help = runner.invoke(build_app(), ["bench", "--help"])
    assert app_help.exit_code == 0 and "jax" in app_help.output
    assert "jax" in registry.benchmarks


def test_quick_bench_prints_ratios_of_its_own_timings(tmp_path):
    out = tmp_path / "bench.json"
    done = runner.invoke(build_app(), ["bench", "jax", "--quick", "--repeats", "2",
                                       "--json", str(out)])
    assert done.exit_code == 0, done.output
    result = json.loads(out.read_text())
    assert result["same_tokens"] is True
    assert (result["batch"], result["seq"], result["new_tokens"]) == (2, 32, 16)
    tokens = {"forward": 2 * 32, "generate": 2 * 16}
    for part, line in (("forward", "forward:"), ("generate", "greedy generation:")):
        side = result[part]
        assert side["torch_s"] > 0 and side["jax_s"] > 0 and side["jax_compile_s"] > 0
        assert side["torch_tokens_per_s"] == tokens[part] / side["torch_s"]
        assert side["jax_tokens_per_s"] == tokens[part] / side["jax_s"]
        assert side["ratio"] == side["jax_tokens_per_s"] / side["torch_tokens_per_s"]
        printed = next(row for row in done.output.splitlines() if row.startswith(line))
        assert f"ratio jax/torch {side['ratio']:.3f}" in printed
        assert f"torch {side['torch_tokens_per_s']:.1f} tok/s" in printed
    assert "same greedy tokens: True" in done.output


def test_bad_sizes_are_a_clean_error():
    done = runner.invoke(build_app(), ["bench", "jax", "--quick", "--repeats", "0"])
    assert done.exit_code == 1 and "must all be >= 1" in done.output
