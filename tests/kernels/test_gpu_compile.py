"""The fused LoRA-backward, NF4-matmul and int8/int4 dequant-matmul kernels compile for a real
GPU, with no GPU present.

The interpreter runs every kernel's fp32 ("ieee") branch only; the bf16 ``tl.dot`` branches that
CUDA runs are checked here by compiling them to a cubin for sm_90 with Triton's bundled ptxas.
Compiling needs ``triton.jit`` kernels, not the interpreter's, so it runs in a fresh process
without ``TRITON_INTERPRET``."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

_COMPILE = r'''
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mlx_kernels import _geglu_triton as G
from mlx_kernels import _lora_triton as L, _nf4_triton as Q, _quantized_linear_triton as I

BLOCKS = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
NF4 = dict(CODES="*u8", ABSMAX_Q="*u8", ABSMAX_SCALE="*fp32", ABSMAX_OFFSET="*fp32", CODEBOOK="*fp32")
SIZES = dict(M="i32", N="i32", K="i32")
DW_ARGS = dict(DY="*bf16", X="*bf16", XA="*fp32", DYB="*fp32", DW="*bf16", DA="*bf16", DB="*bf16",
               DBIAS="*bf16", **SIZES, R="i32", scaling="fp32", tiles_n="i32", tiles_k="i32")
CASES = [
    (L._lora_bwd_dx, dict(DY="*bf16", W="*bf16", A="*bf16", B="*bf16", DX="*bf16", DYB="*fp32",
                          **SIZES, R="i32", scaling="fp32"),
     dict(HAS_DX=True, HAS_DYB=True, IEEE=False, BLOCK_R=16, **BLOCKS)),
    (L._lora_bwd_dw, DW_ARGS, dict(HAS_DW=True, HAS_DA=True, HAS_DB=True, HAS_DBIAS=True, IEEE=False,
                                   BLOCK_R=64, **BLOCKS)),
    (L._lora_bwd_dw, DW_ARGS, dict(HAS_DW=False, HAS_DA=True, HAS_DB=True, HAS_DBIAS=False, IEEE=False,
                                   BLOCK_R=16, **BLOCKS)),
    (Q._nf4_matmul, dict(X="*bf16", **NF4, BIAS="*bf16", Y="*bf16", **SIZES),
     dict(HAS_BIAS=True, IEEE=False, W_DTYPE=tl.bfloat16, GROUP=64, ABSMAX_GROUP=256, **BLOCKS)),
    (Q._nf4_matmul_dx, dict(DY="*bf16", **NF4, DX="*bf16", **SIZES),
     dict(IEEE=False, W_DTYPE=tl.float32, GROUP=64, ABSMAX_GROUP=256, **BLOCKS)),
    (I._quantized_matmul, dict(X="*bf16", Q="*u8", SCALES="*fp16", MINS="*fp16", BIAS="*bf16",
                               Y="*bf16", **SIZES, GROUP="i32", GROUPS="i32"),
     dict(INT4=True, HAS_BIAS=True, IEEE=False, **BLOCKS)),
    (I._quantized_matmul, dict(X="*bf16", Q="*i8", SCALES="*fp32", MINS="*fp32", BIAS="*bf16",
                               Y="*bf16", **SIZES, GROUP="i32", GROUPS="i32"),
     dict(INT4=False, HAS_BIAS=False, IEEE=False, **BLOCKS)),
    # the GPU's tiles for many rows (_quantized_linear_triton.tiles)
    (I._quantized_matmul, dict(X="*bf16", Q="*u8", SCALES="*fp16", MINS="*fp16", BIAS="*bf16",
                               Y="*bf16", **SIZES, GROUP="i32", GROUPS="i32"),
     dict(INT4=True, HAS_BIAS=False, IEEE=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)),
    (I._quantized_matmul, dict(X="*bf16", Q="*i8", SCALES="*fp32", MINS="*fp32", BIAS="*bf16",
                               Y="*bf16", **SIZES, GROUP="i32", GROUPS="i32"),
     dict(INT4=False, HAS_BIAS=True, IEEE=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)),
    # a global read inside a jit function must be a constexpr: the interpreter does not check
    (G._geglu_fwd, dict(G="*bf16", U="*bf16", Y="*bf16", N="i32"), dict(HAS_UP=True, BLOCK=1024)),
    (G._geglu_bwd, dict(DY="*bf16", G="*bf16", U="*bf16", DG="*bf16", DU="*bf16", N="i32"),
     dict(HAS_UP=True, BLOCK=1024)),
]
for fn, signature, constants in CASES:
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__
print("compiled", len(CASES))
'''


@pytest.mark.triton
def test_bf16_branches_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset; 1 is its default
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 11" in done.stdout
