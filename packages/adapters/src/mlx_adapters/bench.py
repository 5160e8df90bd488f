"""``mlx bench lora``: LoRA training steps, ours against HF transformers + HF PEFT.

Same model (default: the built-in ``smollm2-135m-instruct``, fp32), same batch of token ids,
LoRA r=16 alpha=32 on every linear layer of the decoder, AdamW. Each side runs in a fresh
subprocess so peak memory (VmHWM, the resident high-water mark) is its own; both start from the
same adapter weights (PEFT's initial adapter, saved and loaded into ours), so their losses can be
compared step by step. With checkpointing, ours may recompute only the first N decoder layers
(``checkpoint_layers``; PEFT's side always recomputes all). Reported: median step time, peak
RSS, losses, and ratios.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlx_core.memory import allocator_environment

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def _run_side(side: str, model: str, adapter_dir: str, batch: int, seq: int, steps: int,
              checkpointing: bool, checkpoint_layers: int | None, tuned_allocator: bool,
              seed: int) -> dict:
    """One side's training steps, in this process. Returns times, losses and peak memory."""
    import torch

    from mlx_core import load_model
    from mlx_core.memory import tune_allocator

    if tuned_allocator:
        tune_allocator()  # the run-time half; the parent set the start-up half (GLIBC_TUNABLES)

    torch.manual_seed(seed)
    ids = torch.randint(0, 49152 if model == "smollm2-135m-instruct" else 128, (batch, seq),
                        generator=torch.Generator().manual_seed(seed))
    if side == "hf":
        import transformers
        from peft import PeftModel

        directory = load_model(model).source_dir  # the same HF-format weights ours loads
        base = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    else:
        from mlx_adapters import PeftModel

        base = load_model(model)
        base.gradient_checkpointing_enable(checkpointing, checkpoint_layers)
        peft_model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        out = peft_model(input_ids=ids, labels=ids)
        loss = out.loss if hasattr(out, "loss") else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return {"side": side, "median_step_s": statistics.median(times), "step_s": times,
            "losses": losses, "peak_rss_mib": _peak_rss_mib()}


def _initial_adapter(model: str, directory: Path) -> None:
    """PEFT's own initial LoRA adapter for this model (B = 0), saved once for both sides."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from mlx_core import load_model

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(load_model(model).source_dir)
    get_peft_model(base, LoraConfig(**LORA)).save_pretrained(directory)


def run(model: str = "smollm2-135m-instruct", batch: int = 4, seq: int = 512, steps: int = 3,
        checkpointing: bool = False, checkpoint_layers: int | None = None,
        peft_tuned_allocator: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlx-bench-lora-") as tmp:
        adapter = Path(tmp) / "adapter"
        _initial_adapter(model, adapter)
        sides = {}
        for side in ("hf", "mlx"):
            # ours runs with the allocator settings the mlx command makes (mlx_core.memory);
            # PEFT's as a plain python process, or with ours (peft_tuned_allocator)
            tuned = side == "mlx" or peft_tuned_allocator
            args = json.dumps([side, model, str(adapter), batch, seq, steps, checkpointing,
                               checkpoint_layers, tuned, 0])
            done = subprocess.run([sys.executable, "-m", "mlx_adapters.bench", args],
                                  capture_output=True, text=True, timeout=3600,
                                  env=allocator_environment(tuned=tuned))
            if done.returncode != 0:
                raise RuntimeError(f"the {side} side of mlx bench lora failed:\n{done.stderr[-3000:]}")
            sides[side] = json.loads(done.stdout.strip().splitlines()[-1])
    hf, ours = sides["hf"], sides["mlx"]
    return {
        "model": model, "batch": batch, "seq": seq, "steps": steps, "checkpointing": checkpointing,
        "checkpoint_layers": checkpoint_layers, "peft_tuned_allocator": peft_tuned_allocator,
        "mlx": ours, "hf_peft": hf,
        "time_ratio": round(ours["median_step_s"] / hf["median_step_s"], 3),
        "memory_ratio": round(ours["peak_rss_mib"] / hf["peak_rss_mib"], 3),
        "max_loss_difference": max(abs(a - b) for a, b in zip(ours["losses"], hf["losses"], strict=True)),
    }


if __name__ == "__main__":
    print(json.dumps(_run_side(*json.loads(sys.argv[1]))))
