import pytest
import torch
import torch.nn.functional as F

from mlx_kernels import fused_linear_cross_entropy
from mlx_kernels.fused_linear_cross_entropy import default_chunk_size


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 64, 1000])
def test_matches_cross_entropy_on_full_logits(reduction, label_smoothing, with_bias, chunk_size):
    torch.manual_seed(0)
    h = torch.randn(431, 24, dtype=torch.float32)
    w = torch.randn(123, 24, dtype=torch.float32)
    b = torch.randn(123, dtype=torch.float32) if with_bias else None
    y = torch.randint(0, 123, (431,))
    y[::7] = -100
    leaves = [t.clone().requires_grad_() for t in (h, w, b) if t is not None]
    ours = fused_linear_cross_entropy(*leaves[:2], y, bias=leaves[2] if with_bias else None,
                                      label_smoothing=label_smoothing, reduction=reduction,
                                      chunk_size=chunk_size)
    ours.backward()
    refs = [t.clone().requires_grad_() for t in (h, w, b) if t is not None]
    want = F.cross_entropy(F.linear(refs[0], refs[1], refs[2] if with_bias else None).float(), y,
                           label_smoothing=label_smoothing, reduction=reduction)
    want.backward()
    # fp32 logits on both sides; the sum over 431 tokens accumulates rounding in a different order
    assert abs(ours.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    for a, r in zip(leaves, refs, strict=True):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-5)


def test_grads_scale_with_the_incoming_gradient():
    torch.manual_seed(0)
    h = torch.randn(50, 8, requires_grad=True)
    w = torch.randn(30, 8)
    y = torch.randint(0, 30, (50,))
    (3.0 * fused_linear_cross_entropy(h, w, y)).backward()
    ref = h.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(ref @ w.t(), y)).backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-6, rtol=1e-5)


def test_no_grad_skips_gradients():
    h = torch.randn(10, 8, requires_grad=True)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(h, torch.randn(30, 8), torch.randint(0, 30, (10,)))
    assert not loss.requires_grad


def test_default_chunk_keeps_chunk_logits_near_hidden_size():
    assert default_chunk_size(8192, 576, 49152) == 256  # the floor: fewer, larger matmuls
    n, hidden, vocab = 65536, 576, 49152
    chunk = default_chunk_size(n, hidden, vocab)
    assert chunk > 256 and chunk * vocab <= 2 * n * hidden


def test_bad_arguments_are_named():
    h, w, y = torch.randn(4, 8), torch.randn(30, 8), torch.randint(0, 30, (4,))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match=r"hidden \[N, H\]"):
        fused_linear_cross_entropy(h, w, y[:3])


@pytest.mark.triton
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_chunks_match_reference(label_smoothing, reduction, triton_backend):
    torch.manual_seed(0)
    h, w, b = torch.randn(131, 24), torch.randn(1500, 24), torch.randn(1500)
    y = torch.randint(0, 1500, (131,))
    y[::7] = -100
    results = {}
    for backend in ("triton", "torch"):
        import os

        os.environ["MLX_KERNELS"] = backend
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        loss = fused_linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2], chunk_size=64,
                                          label_smoothing=label_smoothing, reduction=reduction)
        loss.backward()
        results[backend] = [loss.detach(), *(t.grad for t in leaves)]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


_PEAK_MEMORY = """
import sys, torch
from mlx_kernels import fused_linear_cross_entropy
from mlx_kernels.bench import rss_peak_growth_mib
n, hidden, vocab, chunk = 8192, 64, 16384, int(sys.argv[1])
h = torch.randn(n, hidden, requires_grad=True)
w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
y = torch.randint(0, vocab, (n,))

def step(h, w, y):
    if chunk:
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk)
    else:  # plain torch: the full [n, vocab] logits (512 MiB in fp32)
        loss = torch.nn.functional.cross_entropy(h @ w.T, y)
    loss.backward()

step(h[:64], w[:128], y[:64] % 128)  # warm-up: library pages are not the op's
h.grad = w.grad = None
print(int(rss_peak_growth_mib(step, h, w, y)))
"""


def _peak_mib(chunk: int) -> int:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(chunk)], capture_output=True,
                          text=True, timeout=300, env={"MLX_KERNELS": "torch", "PATH": ""})
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.slow
def test_peak_memory_grows_with_chunk_size_not_tokens_times_vocab():
    # one chunk's logits: 16 MiB for 256 tokens, 128 MiB for 2048 (the gradient overwrites
    # them in place; the GEMM that consumes it adds about one more); the full logits are
    # 512 MiB, and their gradient as much again. Measured here: about 56, 266 and 1540 MiB.
    small, large, full = _peak_mib(256), _peak_mib(2048), _peak_mib(0)
    assert full >= 1000, full
    assert small < 100, small
    assert small + 150 < large < full / 4, (small, large, full)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    torch.manual_seed(0)
    h = torch.randn(40, 8, requires_grad=True)
    w = torch.randn(30, 8)  # frozen, as an LM head under LoRA
    y = torch.randint(0, 30, (40,))
    fused_linear_cross_entropy(h, w, y).backward()
    ref = h.detach().clone().requires_grad_()
    F.cross_entropy(ref @ w.t(), y).backward()
    torch.testing.assert_close(h.grad, ref.grad, atol=1e-6, rtol=1e-5)
    assert w.grad is None
