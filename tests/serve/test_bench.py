"""`mlx bench serve` runs end to end on a tiny model: both sides produce every requested token,
the ratio is computed from the two measured rates, and no KV block is left held."""

import json

from typer.testing import CliRunner

from mlx_core.cli.app import build_app


def test_bench_serve_reports_ratio_from_its_own_measurements(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "serve", "--model", str(tiny_model_dir), "--num-requests", "6",
        "--prompt-len", "4:12", "--output-len", "2:6", "--request-rate", "50",
        "--hf-batch-sizes", "2,4", "--kv-cache-memory", "4MiB", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "throughput ratio" in result.output
    report = json.loads(out.read_text())
    ours = report["mlx_all_at_once"]
    best = report["hf_static_batches"][str(report["hf_best_batch_size"])]
    assert ours["output_tokens"] == best["output_tokens"] == report["mlx_at_request_rate"][
        "output_tokens"]
    assert abs(report["throughput_ratio"]
               - ours["output_tokens_per_s"] / best["output_tokens_per_s"]) < 0.02 * report[
                   "throughput_ratio"] + 0.01
    assert report["leaked_blocks"] == 0
    assert 0 < report["prefix_caching"]["later_over_first"]
    assert ours["ttft_p50_ms"] <= ours["ttft_p99_ms"]


def test_bench_serve_with_ngram_drafts_reports_them(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "serve", "--model", str(tiny_model_dir), "--num-requests", "4",
        "--prompt-len", "4:12", "--output-len", "8:16", "--request-rate", "0",
        "--hf-batch-sizes", "4", "--kv-cache-memory", "4MiB", "--json", str(out),
        "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
                                '"prompt_lookup_min": 1}', "--no-prepack-weights"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["engine"]["prepack_weights"] is False
    spec = report["speculative"]
    assert spec["config"]["num_speculative_tokens"] == 2 and spec["draft_tokens"] > 0
    assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert "draft tokens kept" in result.output
    assert report["mlx_all_at_once"]["output_tokens"] == report["hf_static_batches"]["4"][
        "output_tokens"]


def test_bench_serve_rejects_a_bad_range(tiny_model_dir):
    result = CliRunner().invoke(build_app(), ["bench", "serve", "--model", str(tiny_model_dir),
                                      "--prompt-len", "50:10"])
    assert result.exit_code != 0
    assert "--prompt-len needs 1 <= LOW <= HIGH" in result.output


def test_bench_quant_serve_reports_ratios_to_the_fp32_engine(tiny_model_dir, tmp_path):
    """The bookkeeping on a tiny model (the figures are measured on the built-in one)."""
    out = tmp_path / "quant.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "quant-serve", "--model", str(tiny_model_dir), "--schemes", "w8a8,int4",
        "--num-requests", "5", "--prompt-len", "4:12", "--output-len", "2:6", "--fusion", "both",
        "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["schemes"]
    assert list(rows) == ["fp32", "fp32 unfused", "w8a8", "w8a8 unfused", "int4", "int4 unfused"]
    assert rows["fp32"]["ratio_to_fp32"] == 1.0 and report["fusion"] == "both"
    assert rows["w8a8"]["ceiling"] == rows["w8a8 unfused"]["ceiling"] == "int8"
    assert rows["int4"]["ceiling"] == "fp32"
    assert len({row["output_tokens"] for row in rows.values()}) == 1  # every token, every engine
    assert all(row["leaked_blocks"] == 0 for row in rows.values())
    # a tiny model's ceiling is far off (rounded, the fraction may read 0.0), but never negative
    assert all(row["fraction_of_ceiling_all_tokens"] >= 0 for row in rows.values())
    assert report["int8_matmul_tops"] > 0
    from mlx_kernels.quantized_linear import cpu_kernels, cpu_kernels_line

    assert report["cpu"] == cpu_kernels()
    assert f"kernels here: {cpu_kernels_line(report['cpu'])}" in result.output.replace("\n", "")
    bad = CliRunner().invoke(build_app(), ["bench", "quant-serve", "--schemes", "int3"])
    assert bad.exit_code == 1 and "unknown quantization scheme" in bad.output
    bad = CliRunner().invoke(build_app(), ["bench", "quant-serve", "--fusion", "maybe"])
    assert bad.exit_code != 0 and "--fusion takes on, off, both" in bad.output


def test_bench_quant_serve_adds_each_engine_over_a_half_precision_kv_cache(tiny_model_dir,
                                                                           tmp_path):
    out = tmp_path / "kv.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "quant-serve", "--model", str(tiny_model_dir), "--schemes", "w8a8,w7a8",
        "--num-requests", "4", "--prompt-len", "4:12", "--output-len", "2:6",
        "--kv-cache-dtypes", "bf16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = report["schemes"]
    assert list(rows) == ["fp32", "fp32 kv bfloat16", "w8a8", "w8a8 kv bfloat16", "w7a8",
                          "w7a8 kv bfloat16"]
    # W7A8's ceiling: the int8 GEMM on narrow weights (the vpmaddubsw form without VNNI)
    assert rows["w7a8"]["ceiling"] == "int8 narrow" and report["int8_narrow_matmul_tops"] > 0
    assert len({row["output_tokens"] for row in rows.values()}) == 1
    assert all(row["leaked_blocks"] == 0 for row in rows.values())
    bad = CliRunner().invoke(build_app(), ["bench", "quant-serve", "--kv-cache-dtypes", "fp8"])
    assert bad.exit_code == 1 and "unknown kv_cache_dtype 'fp8'" in bad.output


def test_bench_serve_reports_the_grammar_share_of_a_structured_run(tmp_path):
    from tests.serve.helpers import byte_level_model_dir

    model = byte_level_model_dir(tmp_path)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(build_app(), [
        "bench", "serve", "--model", str(model), "--num-requests", "6", "--prompt-len", "4:12",
        "--output-len", "8:16", "--request-rate", "0", "--hf-batch-sizes", "4",
        "--kv-cache-memory", "4MiB", "--structured-fraction", "0.5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    structured = json.loads(out.read_text())["structured"]
    assert structured["fraction"] == 0.5 and structured["grammar_seconds"] > 0
    assert 0 < structured["grammar_share_of_run"] < 1
    assert structured["run"]["output_tokens"] > 0 and structured["step_time_ratio"] > 0
    assert "grammar masking" in result.output
