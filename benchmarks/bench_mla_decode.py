"""Decode speed of multi-head latent attention (DeepSeek-V2/V3) over a long cached context: the
absorbed form (queries taken into the latent space; mlx_core.models.mla) against the expanded
form (every cached latent through kv_b_proj at each step, as HF transformers runs it), same
weights, same process, interleaved rounds; reported as tokens/s and a ratio.

DeepSeek-V2-Lite's attention geometry (16 heads, kv_lora_rank 512, qk 128 + 64, v 128, hidden
2048) with random weights, few layers and dense MLPs, so that it fits any machine:

    python benchmarks/bench_mla_decode.py [--layers 4] [--contexts 256,1024,2048] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from mlx_core import build_model, get_preset, stream_generate
from mlx_core.models.mla import MultiHeadLatentAttention


def decode_seconds(model, context: int, new_tokens: int) -> float:
    """Seconds per new token after a ``context``-token prompt (the prefill not counted)."""
    prompt = torch.randint(3, model.config.vocab_size, (context,)).tolist()
    started = None
    for count, _ in enumerate(stream_generate(model, prompt, max_new_tokens=new_tokens + 1)):
        if count == 0:
            started = time.perf_counter()  # the first token ends the prefill
    return (time.perf_counter() - started) / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", default="256,1024,2048")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    lite = get_preset("deepseek-v2-lite")
    config = dataclasses.replace(lite, num_layers=args.layers, vocab_size=32000, num_experts=0,
                                 n_shared_experts=0, intermediate_size=5632)
    torch.manual_seed(0)
    model = build_model(config).eval()
    absorbed = MultiHeadLatentAttention._absorbed_weights

    def run(form: str, context: int) -> float:
        MultiHeadLatentAttention._absorbed_weights = (
            absorbed if form == "absorbed" else lambda self: None)
        try:
            with torch.inference_mode():
                return decode_seconds(model, context, args.new_tokens)
        finally:
            MultiHeadLatentAttention._absorbed_weights = absorbed

    result = {"layers": args.layers, "threads": torch.get_num_threads(), "contexts": {}}
    for context in (int(c) for c in args.contexts.split(",")):
        best = {"expanded": float("inf"), "absorbed": float("inf")}
        for _ in range(args.rounds):
            for form in best:
                best[form] = min(best[form], run(form, context))
        row = {form: round(1 / s, 2) for form, s in best.items()}
        row["ratio"] = round(best["expanded"] / best["absorbed"], 2)
        result["contexts"][context] = row
        print(f"context {context}: expanded {row['expanded']} tok/s, absorbed "
              f"{row['absorbed']} tok/s ({row['ratio']}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
