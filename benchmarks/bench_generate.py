"""Greedy decoding speed of mlx_core.generate against HF transformers' generate, same weights,
same process, same prompt; reported as tokens/s and as a ratio (> 1: mlx is faster).

    python benchmarks/bench_generate.py [--model smollm2-135m-instruct] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import transformers

import mlx_core


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ours = mlx_core.load_model(args.model)
    tokenizer = mlx_core.load_tokenizer(args.model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ours.source_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem about the sea."}])
    n = args.new_tokens

    def run_ours():
        out = mlx_core.generate(ours, prompt, max_new_tokens=n, stop_token_ids=[])
        assert len(out) == n

    @torch.inference_mode()
    def run_hf():
        hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id)

    t_ours, t_hf = best_time(run_ours, args.repeats), best_time(run_hf, args.repeats)
    result = {
        "model": args.model, "prompt_tokens": len(prompt), "new_tokens": n,
        "threads": torch.get_num_threads(),
        "mlx_tokens_per_s": round(n / t_ours, 2), "hf_tokens_per_s": round(n / t_hf, 2),
        "speedup_vs_hf": round(t_hf / t_ours, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
