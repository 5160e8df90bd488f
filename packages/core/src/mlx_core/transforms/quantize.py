"""Quantization as a transform: a model's linear layers swapped for int8 / int4 / W8A8 ones.

Schemes (``parse_scheme``): ``int8`` (weight-only, per output channel), ``int4`` (weight-only,
groups of 32 inputs; ``int4-g64``, ``int4-g128`` for larger groups), ``w8a8`` (int8 weights,
activations quantized per token on the fly) and ``w7a8``: W8A8 whose weights lie within +-64
(7 bits' range, stored as int8), so a CPU without int8 dot-product instructions (AVX2, no VNNI)
multiplies them in vpmaddubsw's form, exactly and ~1.35x faster; the MLP's output projections
keep the full range, as llama.cpp's mixes keep ``ffn_down`` at more bits (on the built-in model
on an AMD EPYC perplexity +2.2% over fp32 against +4.6% with them narrow too, and W8A8's +1.35%;
on an Ice Lake Xeon +2.6% against +2.7%: docs/quantization.md). The token
embedding becomes an int8 lookup table in every scheme (a lookup dequantizes only the rows it
reads). The LM head is int8 under int4 too, as llama.cpp's 4-bit mixes keep their output matrix
at 6-8 bits: on the built-in model a 4-bit head alone costs more perplexity than every other
layer's 4 bits together. With tied embeddings the head and the table share one int8 copy. MoE
routers stay in full precision (a router's few weights decide which experts run). The quantized
weights are buffers, not parameters: nothing trains them, and they travel with ``.to(device)``
and the state dict.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

import torch
from torch import nn

from mlx_core.transforms.swap import swap_linears
from mlx_kernels import quantized_linear as ql

SCHEMES = ("int8", "int4", "w8a8", "w7a8")
# "gguf": a GGUF file's quantized tensors loaded as they are shipped (load_model), not a transform
LOADED_AS_SHIPPED = "gguf"
_SPELLINGS = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128", "w8a8", "w7a8", LOADED_AS_SHIPPED)
_ROUTER = re.compile(r"(^|\.)(block_sparse_moe|mlp)\.gate$")  # Mixtral, Qwen3-MoE
_MLP_OUTPUT = re.compile(r"(^|\.)(down_proj|w2)$")  # the zoo's MLPs and experts; Mixtral's experts


@dataclass(frozen=True)
class QuantizationScheme:
    name: str  # one of SCHEMES, but "w7a8" is "w8a8" with narrow weights
    group_size: int | None = None  # int4 only
    narrow: bool = False  # w7a8: int8 weights within +-ql.NARROW_QMAX (MLP outputs excepted)

    def __str__(self) -> str:
        if self.narrow:
            return "w7a8"
        return self.name if self.group_size in (None, 32) else f"{self.name}-g{self.group_size}"


def parse_scheme(scheme: str | QuantizationScheme, group_size: int | None = None) -> QuantizationScheme:
    """``"int8"``, ``"w8a8"``, ``"w7a8"``, ``"int4"`` (group 32) or ``"int4-g64"`` (or
    ``group_size=64``)."""
    if isinstance(scheme, QuantizationScheme):
        return scheme
    text = str(scheme).strip().lower()
    m = re.fullmatch(r"int4-g(\d+)", text)
    name, size = ("int4", int(m.group(1))) if m else (text, None)
    if name == LOADED_AS_SHIPPED and group_size is None:
        return QuantizationScheme(name)
    if name not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose one of "
                         f"{', '.join(_SPELLINGS)}")
    narrow, name = name == "w7a8", "w8a8" if name == "w7a8" else name
    if group_size is not None and size is not None and group_size != size:
        raise ValueError(f"scheme {scheme!r} and group_size={group_size} disagree; give one")
    size = size or group_size
    if name != "int4":
        if size is not None:
            raise ValueError(f"group_size applies to int4 only ({text} scales each output "
                             "channel as a whole)")
        return QuantizationScheme(name, narrow=narrow)
    size = size or 32
    if size not in ql.INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {size} is not supported; choose one of "
                         f"{', '.join(map(str, ql.INT4_GROUP_SIZES))}")
    return QuantizationScheme(name, size)


class QuantizedLinear(nn.Module, abc.ABC):
    """What every quantized linear layer has: the shape, the bias (a buffer), its scheme, and
    the dtype it computes in (adapters trained beside it use that dtype)."""

    scheme = ""
    compute_dtype = torch.float32

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cpu_layout = ql.CpuLayout()

    def computing_in(self, dtype: torch.dtype) -> QuantizedLinear:
        self.compute_dtype = dtype
        return self

    @abc.abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` in fp32, as the layer's reference computes with it."""

    def dequantized(self) -> nn.Linear:
        """A frozen ``nn.Linear`` with the de-quantized weight (to merge adapters into)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device, dtype=self.compute_dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, scheme={self.scheme}")


class Int8Linear(QuantizedLinear):
    scheme = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, layer: nn.Linear, qmax: int = 127):
        return cls(*ql.quantize_int8(layer.weight, qmax=qmax), layer.bias).computing_in(
            layer.weight.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        return ql.dequantize_int8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ql.int8_linear(x, self.qweight, self.scale, self.bias, cpu_layout=self._cpu_layout)


class W8A8Linear(Int8Linear):
    scheme = "w8a8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ql.w8a8_linear(x, self.qweight, self.scale, self.bias, cpu_layout=self._cpu_layout)


class Int4Linear(QuantizedLinear):
    scheme = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__(2 * qweight.shape[1], qweight.shape[0], bias)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @classmethod
    def from_linear(cls, layer: nn.Linear, group_size: int):
        return cls(*ql.quantize_int4(layer.weight, group_size), layer.bias).computing_in(
            layer.weight.dtype)

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    def dequantized_weight(self) -> torch.Tensor:
        return ql.dequantize_int4(self.qweight, self.scales, self.mins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ql.int4_linear(x, self.qweight, self.scales, self.mins, self.bias,
                              cpu_layout=self._cpu_layout)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """A token embedding kept quantized; a lookup dequantizes only its rows. int8 rows with a
    scale each (or per group of a row's values: GGUF's Q8_0, Q5_0, Q6_K), or int4 rows
    (``scales`` and ``mins`` per group: GGUF's Q4_0/Q4_1/Q4_K embeddings)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor | None = None, *,
                 scales: torch.Tensor | None = None, mins: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, multiplier: float | None = None):
        super().__init__()
        self.multiplier = multiplier  # the scaled embedding's (Gemma), kept through quantization
        self.int4 = mins is not None
        self.num_embeddings = qweight.shape[0]
        self.embedding_dim = qweight.shape[1] * (2 if self.int4 else 1)
        self.register_buffer("qweight", qweight)
        if self.int4:
            self.register_buffer("scales", scales)
            self.register_buffer("mins", mins)
        else:
            self.register_buffer("scale", scale)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._rows(ids)
        if self.multiplier is None:
            return rows
        return rows * torch.tensor(self.multiplier, dtype=rows.dtype)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int4:
            rows = ql.dequantize_int4(self.qweight[ids.reshape(-1)], self.scales[ids.reshape(-1)],
                                      self.mins[ids.reshape(-1)], self.dtype)
            return rows.view(*ids.shape, self.embedding_dim)
        return ql.dequantize_int8(self.qweight[ids], self.scale[ids], self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The table itself (no multiplier): what a checkpoint stores."""
        return self._rows(torch.arange(self.num_embeddings, device=self.qweight.device))

    def as_linear(self, scheme: str, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """The LM head over the same quantized tensors (tied embeddings)."""
        if self.int4:
            return Int4Linear(self.qweight, self.scales, self.mins, bias)
        return _int8_layer(scheme)(self.qweight, self.scale, bias)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={'int4' if self.int4 else 'int8'}"


def _int8_layer(scheme: str) -> type[Int8Linear]:
    """The layer for int8 weights under ``scheme``: W8A8's (and W7A8's) quantizes the activations
    too."""
    return W8A8Linear if parse_scheme(scheme).name == "w8a8" else Int8Linear


def _check_fits(model: nn.Module, scheme: QuantizationScheme) -> None:
    """Every int4 layer's inputs split into whole groups, or one error naming the first that
    does not (before any layer is touched)."""
    if scheme.name != "int4":
        return
    head = getattr(model, "lm_head", None)
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and layer is not head and not _ROUTER.search(name):
            ql.check_int4_shape(layer.in_features, scheme.group_size, name)


def quantize(model: nn.Module, scheme: str | QuantizationScheme = "int8", *,
             group_size: int | None = None, calibration=None,
             smoothquant_alpha: float | None = None) -> nn.Module:
    """Quantize ``model``'s linear layers (and its token embedding) in place; returns it.

    ``model.quantization`` records the scheme (e.g. ``"int4"``, ``"int4-g64"``). For W8A8,
    ``calibration`` (token-id sequences, e.g. ``smoothquant.default_calibration(tokenizer)``)
    first moves activation outliers into the weights (SmoothQuant, ``smoothquant_alpha``):
    on the built-in model perplexity +1.8% over fp32 instead of +7.7%."""
    scheme = parse_scheme(scheme, group_size)
    if scheme.name == LOADED_AS_SHIPPED:
        raise ValueError("'gguf' loads a GGUF file's quantized tensors as they are shipped: "
                         "load_model(path_or_name, quantization='gguf'); an already loaded model "
                         "is quantized with int8, int4 or w8a8")
    if getattr(model, "quantization", None):
        raise ValueError(f"this model is quantized already ({model.quantization}); load it "
                         "again in full precision to quantize it another way")
    _check_fits(model, scheme)
    if calibration is not None:
        if scheme.name != "w8a8":
            raise ValueError(f"calibration applies to w8a8 (SmoothQuant), not {scheme}")
        from mlx_core.transforms.smoothquant import DEFAULT_ALPHA, smooth

        smooth(model, calibration, smoothquant_alpha or DEFAULT_ALPHA)
    backbone = getattr(model, "model", None)
    embedding = getattr(backbone, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    table = None
    if isinstance(embedding, nn.Embedding):
        table = QuantizedEmbedding(*ql.quantize_int8(embedding.weight), dtype=embedding.weight.dtype,
                                   multiplier=getattr(embedding, "multiplier", None))
    tied = (table is not None and isinstance(head, nn.Linear) and head.weight is embedding.weight)

    def build(name: str, layer: nn.Linear) -> nn.Module | None:
        if _ROUTER.search(name):
            return None
        if tied and layer is head:
            return table.as_linear(scheme.name, layer.bias)
        if scheme.name == "int4" and layer is not head:
            return Int4Linear.from_linear(layer, scheme.group_size)
        narrow = scheme.narrow and layer is not head and not _MLP_OUTPUT.search(name)
        return _int8_layer(scheme.name).from_linear(layer, qmax=ql.NARROW_QMAX if narrow else 127)

    with torch.no_grad():
        swap_linears(model, build)
        if table is not None:
            backbone.embed_tokens = table
    model.quantization = str(scheme)
    return model


def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], scheme: str) -> nn.Module:
    """Fill ``model`` (built on the meta device) from a quantized state: ``NAME.qweight`` with
    ``.scales`` + ``.mins`` (int4) or ``.scale`` (int8; W8A8 when ``scheme`` is ``"w8a8"``) make
    quantized layers, ``model.embed_tokens.qweight`` + ``.scale`` the int8 table (shared by a
    tied head), everything else loads as it is. Raises on a missing or unexpected tensor.
    Tensors are first made 64-byte aligned: one read out of a file may start at any byte, which
    torch's CPU kernels cannot take (``quantized_linear.aligned``)."""
    state = {k: ql.aligned(v) for k, v in state.items()}
    backbone, head = model.model, getattr(model, "lm_head", None)

    def take(prefix: str, *names: str):
        return [state.pop(f"{prefix}.{n}") for n in names]

    table = None
    if "model.embed_tokens.qweight" in state:
        dtype = state_dtype(state)
        multiplier = getattr(backbone.embed_tokens, "multiplier", None)
        if "model.embed_tokens.mins" in state:
            q, scales, mins = take("model.embed_tokens", "qweight", "scales", "mins")
            table = QuantizedEmbedding(q, scales=scales, mins=mins, dtype=dtype,
                                       multiplier=multiplier)
        else:
            table = QuantizedEmbedding(*take("model.embed_tokens", "qweight", "scale"), dtype=dtype,
                                       multiplier=multiplier)
        backbone.embed_tokens = table

    def build(name: str, layer: nn.Linear) -> nn.Module | None:
        bias = state.pop(f"{name}.bias", None)
        if f"{name}.qweight" not in state:
            if layer is head and table is not None and model.config.tie_word_embeddings:
                return table.as_linear(scheme, bias)
            if bias is not None:
                state[f"{name}.bias"] = bias  # a full-precision layer: loaded below
            return None
        if f"{name}.mins" in state:
            return Int4Linear(*take(name, "qweight", "scales", "mins"), bias)
        return _int8_layer(scheme)(*take(name, "qweight", "scale"), bias)

    swap_linears(model, build)
    expected = set(model.state_dict())
    quantized = {k for k, v in model.state_dict().items() if v.device.type != "meta"}
    missing = sorted(expected - quantized - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the quantized weights do not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.quantization = scheme
    return model


def state_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The compute dtype a quantized state implies: that of its floating full-precision tensors."""
    return next((v.dtype for k, v in state.items() if k.endswith(".weight") and v.is_floating_point()),
                torch.float32)
