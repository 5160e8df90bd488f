"""Engine settings and the KV-cache size they imply."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mlx_serve.embedding import check_pooling
from mlx_serve.scheduler import SchedulerConfig
from mlx_serve.spec_decode import SpeculativeConfig

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string such as ``"2GiB"``, ``"512MB"``, ``"1.5g"``."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as an amount of memory; write e.g. 2GiB, 512MB "
                         "or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_memory(device: torch.device) -> int:
    """Free memory where the cache will live: the GPU's, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # no way to ask: assume a modest machine


def canonical_kv_cache_dtype(name: str) -> str:
    """``"auto"`` or the torch name of the type ``name`` names (``mlx_serve.engine.default_dtype``'s
    names: float16/fp16, bfloat16/bf16, float32/fp32); a ValueError listing the choices."""
    from mlx_serve.engine import default_dtype

    if name == "auto":
        return name
    try:
        return str(default_dtype(name)).removeprefix("torch.")
    except ValueError:
        raise ValueError(f"unknown kv_cache_dtype {name!r}: choose auto (the model's), float16 "
                         "(fp16), bfloat16 (bf16) or float32 (fp32)") from None


@dataclass
class EngineConfig:
    """``num_blocks`` fixes the cache size outright; otherwise ``kv_cache_memory`` (bytes or
    e.g. ``"2GiB"``) or ``kv_cache_fraction`` of the free memory, never more than
    ``max_num_seqs`` sequences of ``max_model_len`` tokens need."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory: int | str | None = None
    kv_cache_fraction: float = 0.25
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    max_loras: int = 4  # LoRA adapters loaded at once (slots)
    max_lora_rank: int = 64
    seed: int = 0
    # CPU fp32: a oneDNN-packed copy of each linear weight beside it (as much memory again as
    # the linear weights) for faster GEMMs, most at a decode step's few rows
    prepack_weights: bool = True
    # q/k/v and gate/up as one GEMM each (mlx_core.transforms.fuse_projections; the same
    # logits); a LoRA adapter loaded later splits the layers it targets again
    fuse_projections: bool = True
    # vLLM's form, e.g. {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    speculative_config: SpeculativeConfig | dict | None = None
    # quantize the model's weights at start: "int8", "int4", "int4-g64", "w8a8", ...
    # (mlx_core.transforms.quantize); None serves them as they are
    quantization: str | None = None
    # the KV cache's element type: "auto" (the model's), or "float16"/"bfloat16" under an fp32
    # model on CPU (half the cache's memory, so twice the blocks for the same budget, and half the
    # bytes decode attention reads; attention still computes in fp32); vLLM's kv_cache_dtype
    kv_cache_dtype: str = "auto"
    # embeddings (LLM.embed, /v1/embeddings): the last token's final hidden state, or the mean
    pooling: str = "last"
    # structured outputs: append the tokens a grammar forces without a forward pass each
    jump_forward: bool = True
    # tensor parallelism (mlx_serve.tensor_parallel): the model split over this many processes,
    # on ``nnodes`` machines joined at master_addr:master_port (None: a free port, one node)
    tensor_parallel_size: int = 1
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    # ranks on this machine's CPU exchange through shared memory (False: gloo's loopback TCP)
    shm_collectives: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (got {self.block_size})")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1] (got {self.kv_cache_fraction})")
        self.scheduler_config()  # checks the policy and the limits now, not once a model loaded
        self.speculative_config = SpeculativeConfig.of(self.speculative_config)
        if self.quantization is not None:
            from mlx_core.transforms import parse_scheme

            self.quantization = str(parse_scheme(self.quantization))
        check_pooling(self.pooling)
        self.kv_cache_dtype = canonical_kv_cache_dtype(self.kv_cache_dtype)
        from mlx_serve.tensor_parallel import check_parallel_options

        check_parallel_options(self.tensor_parallel_size, self.nnodes, 0)

    def cache_dtype(self, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The KV cache's element type for a model of ``model_dtype`` on ``device``."""
        if self.kv_cache_dtype == "auto":
            return model_dtype
        dtype = getattr(torch, self.kv_cache_dtype)
        if dtype != model_dtype and (device.type != "cpu" or model_dtype != torch.float32):
            raise ValueError(f"kv_cache_dtype {self.kv_cache_dtype} under a {model_dtype} model "
                             f"on {device.type}: a cache of another type than the model's runs "
                             "under an fp32 model on CPU only; use kv_cache_dtype auto here")
        return dtype

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens,
                               self.enable_chunked_prefill, self.scheduling_policy)

    def resolve_num_blocks(self, bytes_per_block: int, max_model_len: int,
                           device: torch.device) -> int:
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_cache_memory is not None:
            budget = parse_memory(self.kv_cache_memory)
        else:
            budget = int(self.kv_cache_fraction * available_memory(device))
        enough = self.max_num_seqs * -(-max_model_len // self.block_size)
        blocks = min(budget // bytes_per_block, enough)
        if blocks < 1:
            raise ValueError(f"the KV-cache budget ({budget} bytes) does not hold one block of "
                             f"{bytes_per_block} bytes; give it more with kv_cache_memory")
        return blocks
