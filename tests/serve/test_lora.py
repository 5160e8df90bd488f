"""Multi-LoRA serving: requests for two PEFT adapters and for the base model share one batch,
and each one's greedy output is token-for-token HF PEFT's `generate` with that adapter alone.
Adapters load and unload at run time; a reloaded name never reuses the old adapter's cached
prefixes; adapters that cannot be served are refused with the reason."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from mlx_core import load_model
from mlx_serve import LLM, SamplingParams

NEW_TOKENS = 10
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig options: plain, rsLoRA with a per-module rank, attention only
    "plain": dict(r=8, lora_alpha=16, target_modules=TARGETS),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS,
                   rank_pattern={"down_proj": 6}, alpha_pattern={"o_proj": 3}),
    "attention": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
}


def _prompts():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in (9, 4, 21, 13, 17)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny HF llama, three PEFT adapters with random A and B, and HF PEFT's greedy outputs
    for every (prompt, adapter) pair, each generated alone."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("multi-lora")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    hf.save_pretrained(root / "base")
    for name, options in ADAPTERS.items():
        torch.manual_seed(len(name))
        peft_model = peft.get_peft_model(
            transformers.LlamaForCausalLM.from_pretrained(root / "base"),
            peft.LoraConfig(init_lora_weights=False, **options))
        with torch.no_grad():  # B is random too, and large enough to change the greedy path
            for module_name, param in peft_model.named_parameters():
                if "lora_B" in module_name:
                    param.normal_(0, 0.5)
        peft_model.save_pretrained(root / name)
    refs = {}
    reference = peft.PeftModel.from_pretrained(hf, root / "plain", adapter_name="plain")
    for name in ADAPTERS:
        if name != "plain":
            reference.load_adapter(root / name, adapter_name=name)
    reference.eval()
    for name in [None, *ADAPTERS]:
        for i, prompt in enumerate(_prompts()):
            with torch.no_grad():
                if name is None:
                    with reference.disable_adapter():
                        out = _hf_generate(reference, prompt)
                else:
                    reference.set_adapter(name)
                    out = _hf_generate(reference, prompt)
            refs[name, i] = out
    return root, refs


def _hf_generate(model, prompt):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy():
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _llm(root, **options):
    return LLM(load_model(root / "base"), block_size=4, **options)


def _assert_no_leaks(llm):
    engine = llm.engine
    assert not engine.requests and engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.hf_parity
@pytest.mark.parametrize("options", [{}, dict(max_num_batched_tokens=9)],
                         ids=["default", "chunked-prefill"])
def test_mixed_adapter_batch_equals_hf_peft_one_by_one(served, options):
    root, refs = served
    llm = _llm(root, loras={name: root / name for name in ADAPTERS}, **options)
    jobs = [(name, i) for i in range(len(_prompts())) for name in [None, *ADAPTERS]]
    assert len({tuple(refs[job]) for job in jobs}) > len(_prompts()), \
        "the adapters must change the outputs, or the test proves nothing"
    for _ in range(2):  # the second time, prompts hit the prefix cache of their own adapter
        outs = llm.generate([{"prompt_token_ids": _prompts()[i]} for _, i in jobs], _greedy(),
                            lora=[name for name, _ in jobs])
        assert [o.outputs[0].token_ids for o in outs] == [refs[job] for job in jobs]
    _assert_no_leaks(llm)


@pytest.mark.hf_parity
def test_load_unload_at_run_time_and_reload_does_not_reuse_cached_prefixes(served):
    root, refs = served
    llm = _llm(root, max_loras=1)
    prompt = {"prompt_token_ids": _prompts()[2]}
    llm.add_lora("tuned", root / "plain")
    assert llm.generate(prompt, _greedy(), lora="tuned")[0].outputs[0].token_ids == refs[
        "plain", 2]
    with pytest.raises(ValueError, match="all 1 LoRA slots are in use"):
        llm.add_lora("other", root / "attention")
    engine = llm.engine
    engine.add_request(_prompts()[0], _greedy(), request_id="busy", lora_name="tuned")
    with pytest.raises(ValueError, match="in use by 1 unfinished request"):
        llm.remove_lora("tuned")
    engine.abort_request("busy")
    engine.step()
    llm.remove_lora("tuned")
    assert engine.list_loras() == []
    with pytest.raises(ValueError, match="no LoRA adapter named 'tuned'"):
        llm.generate(prompt, _greedy(), lora="tuned")
    llm.add_lora("tuned", root / "rslora")  # same name, other weights: the old prefix is stale
    assert llm.generate(prompt, _greedy(), lora="tuned")[0].outputs[0].token_ids == refs[
        "rslora", 2]
    assert llm.generate(prompt, _greedy())[0].outputs[0].token_ids == refs[None, 2]
    _assert_no_leaks(llm)


def _copy_adapter(source, target, config_changes=None, tensors=None):
    target.mkdir()
    config = json.loads((source / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (target / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(source / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, target / "adapter_model.safetensors")
    return target


def test_adapters_that_cannot_be_served_are_refused_with_the_reason(served, tmp_path):
    root, _ = served
    llm = _llm(root, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8 at .*above max_lora_rank=4"):
        llm.add_lora("big", root / "plain")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llm.add_lora("missing", tmp_path / "nowhere")
    dora = _copy_adapter(root / "attention", tmp_path / "dora", {"use_dora": True})
    with pytest.raises(ValueError, match="DoRA adapter"):
        llm.add_lora("dora", dora)
    for init in ("pissa", "pissa_niter_4", "olora"):  # their weights need the residual base
        other = _copy_adapter(root / "attention", tmp_path / init, {"init_lora_weights": init})
        with pytest.raises(ValueError, match=f"'{init}'-initialised adapter"):
            llm.add_lora(init, other)
    for change, reason in (({"bias": "all"}, "bias='all'"), ({"lora_bias": True}, "lora_bias=True")):
        biased = _copy_adapter(root / "attention", tmp_path / reason.split("=")[0], change)
        with pytest.raises(ValueError, match=reason):
            llm.add_lora("biased", biased)
    adalora = _copy_adapter(root / "attention", tmp_path / "adalora",
                            {"peft_type": "ADALORA", "target_r": 2, "init_r": 4, "total_step": 10})
    with pytest.raises(ValueError, match="ADALORA adapter"):
        llm.add_lora("adalora", adalora)
    wide = _copy_adapter(root / "attention", tmp_path / "wide", tensors=lambda w: {
        k: torch.zeros(v.shape[0], 99) if "lora_A" in k else v for k, v in w.items()})
    with pytest.raises(ValueError, match="another base model"):
        llm.add_lora("wide", wide)
    head = _copy_adapter(root / "attention", tmp_path / "head", tensors=lambda w: {
        **w, "base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(128, 2)})
    with pytest.raises(ValueError, match="targets lm_head"):
        llm.add_lora("head", head)
    assert llm.engine.list_loras() == []  # nothing half-loaded
    llm.add_lora("ok", root / "attention")
    with pytest.raises(ValueError, match="already loaded"):
        llm.add_lora("ok", root / "attention")
