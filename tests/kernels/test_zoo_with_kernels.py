"""The model zoo's forward and backward with MLX_KERNELS=triton (interpreter) match the torch path."""

import pytest
import torch

from mlx_core import build_model, get_preset


@pytest.mark.triton
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mixtral", "tiny-qwen3-moe"])
def test_tiny_model_matches_between_backends(preset, monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_preset(preset))
    ids = torch.randint(0, 128, (2, 9))

    def run(backend):
        monkeypatch.setenv("MLX_KERNELS", backend)
        model.zero_grad()
        logits = model(ids)
        loss = model(ids, labels=ids)
        loss.backward()
        return logits.detach(), loss.detach(), model.model.embed_tokens.weight.grad.clone()

    ref, got = run("torch"), run("triton")
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
