"""Serving a quantized base: the engine's greedy output equals ``mlx_core.generate`` on the same
quantized model, prompt by prompt (every zoo family, int8 / int4 / W8A8); LoRA adapters on a
quantized base (kept in fp32) equal the quantized model with the adapter added by hand.

With the CPU fast paths the quantized GEMMs take a different kernel above 64 rows (see
mlx_kernels.quantized_linear); a step budget of 16 tokens keeps every forward of both sides on
the same kernels, as a serving step of a few decodes is."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from mlx_core import generate, load_model
from mlx_core.transforms import fuse_projections
from mlx_serve import LLM, SamplingParams

from .test_engine import FAMILIES as ENGINE_FAMILIES

NEW_TOKENS = 10
# the engine tests' tiny HF families (sliding window aside: covered there)
FAMILIES = {name: ENGINE_FAMILIES[name] for name in ("llama", "qwen2", "gpt2", "mixtral")}


def _prompts():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 4, 21, 13)]


def _greedy():
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(request.param)
    FAMILIES[request.param]().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("scheme", ["int8", "int4", "w8a8", "w7a8"])
def test_engine_on_a_quantized_base_equals_generate_on_it(family_dir, scheme):
    model = load_model(family_dir, quantization=scheme)
    refs = [generate(model, p, max_new_tokens=NEW_TOKENS, stop_token_ids=[]) for p in _prompts()]
    llm = LLM(load_model(family_dir), quantization=scheme, max_num_batched_tokens=16,
              block_size=4)
    assert llm.engine.model.quantization == scheme == llm.engine.config.quantization
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], _greedy())
    assert [o.outputs[0].token_ids for o in outs] == refs
    blocks = llm.engine.blocks
    assert blocks.num_free_blocks == blocks.num_blocks


def test_engine_serves_a_model_quantized_before_and_refuses_another_scheme(family_dir):
    model = load_model(family_dir, quantization="int8")
    llm = LLM(model, max_num_batched_tokens=16)
    assert llm.engine.config.quantization == "int8"
    with pytest.raises(ValueError, match="quantized with int8 already"):
        LLM(model, quantization="int4")
    with pytest.raises(ValueError, match="unknown quantization scheme 'fp4'"):
        LLM(model, quantization="fp4")


class _WithLora(nn.Module):
    """The reference: a quantized layer plus ``scaling * B A x``, written out by hand."""

    def __init__(self, base, a, b, scaling):
        super().__init__()
        self.base, self.a, self.b, self.scaling = base, a, b, scaling

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.a.t() @ self.b.t())


@pytest.mark.parametrize("scheme", ["int4", "w8a8"])
def test_lora_adapters_on_a_quantized_base(tmp_path, scheme):
    torch.manual_seed(0)
    hf = FAMILIES["llama"]()
    hf.save_pretrained(tmp_path / "base")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "sql")
    quantized = load_model(tmp_path / "base", quantization=scheme)
    reference = copy.deepcopy(quantized)
    tensors = load_file(tmp_path / "sql" / "adapter_model.safetensors")
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = tensors[key.replace("lora_A", "lora_B")]
        parent, _, child = module.rpartition(".")
        holder = reference.get_submodule(parent)
        setattr(holder, child, _WithLora(getattr(holder, child), a, b, 8 / 4))
    prompts = _prompts()
    refs = {None: [generate(quantized, p, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                   for p in prompts],
            "sql": [generate(reference, p, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
                    for p in prompts]}
    assert refs[None] != refs["sql"]  # the adapter changes the greedy path
    llm = LLM(quantized, loras={"sql": str(tmp_path / "sql")}, max_num_batched_tokens=16,
              block_size=4)
    requests = [(p, name) for p in prompts for name in (None, "sql")]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests], _greedy(),
                        lora=[name for _, name in requests])
    for (prompt, name), out in zip(requests, outs, strict=True):
        assert out.outputs[0].token_ids == refs[name][prompts.index(prompt)], (name, prompt)
    # the adapter's tensors stay fp32 beside the quantized base
    layer = llm.engine.model.model.layers[0].self_attn.q_proj
    assert layer.lora_a.dtype == torch.float32 and type(layer.base).__name__.endswith("Linear")


@pytest.mark.builtin_model
def test_serving_the_builtin_models_gguf_tensors_as_shipped():
    """``quantization="gguf"``: the engine serves the Q4_1/Q8_0 tensors the built-in model ships,
    greedy equal to ``mlx_core.generate`` on the same model."""
    from mlx_core import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}])
               for text in ("What is the capital of France?", "Name a color.")]
    model = load_model("smollm2-135m-instruct", quantization="gguf")
    # as the engine runs it: the bf16-rounded logits of its int4 kernels tie now and then, and
    # the separate layers sum in another order
    fuse_projections(model)
    refs = [generate(model, p, max_new_tokens=8, stop_token_ids=[]) for p in prompts]
    llm = LLM("smollm2-135m-instruct", quantization="gguf", max_num_batched_tokens=16,
              max_num_seqs=4)
    assert llm.engine.model.quantization == "gguf"
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs
