"""LoRA in JAX: PEFT-format adapters (written by mlx_adapters and by HF peft) load torch-free onto
the Flax model and give the torch logits (max |difference| <= 1e-4, fp32); merged == unmerged;
LoRA-only training updates only A and B, its gradients equal torch's (1e-5), and the adapter it
saves loads in torch to the same logits; bad adapters are refused by name."""

import copy
import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import mlx_jax
from mlx_adapters import LoraConfig, PeftModel, get_peft_model
from mlx_jax import lora
from mlx_jax.loading import param_name
from mlx_jax.training import adamw, create_train_state, loss_and_grads, train

_forward = nnx.jit(lambda model, ids: model(ids))
IDS = np.random.RandomState(0).randint(0, 128, (2, 11))


def _torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.tensor(ids)).numpy()


def _peft(torch_model, **config):
    """A trainable mlx_adapters LoRA with random A and B (B = 0 would test nothing)."""
    torch.manual_seed(1)
    return get_peft_model(copy.deepcopy(torch_model), LoraConfig(init_lora_weights=False, **config))


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj", "down_proj"],
         rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3}, layers_to_transform=[1]),
    dict(r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["gate_proj"]),
], ids=["names", "regex-rslora-patterns-layers", "all-linear-exclude"])
def test_mlx_adapters_lora_gives_the_torch_logits(tiny_pair, tmp_path, config):
    torch_model, directory, _ = tiny_pair("tiny-llama")
    peft_model = _peft(torch_model, **config)
    peft_model.save_pretrained(tmp_path / "adapter")
    model = lora.load_lora(mlx_jax.load_model(directory), tmp_path / "adapter")
    expected = _torch_logits(peft_model)
    assert np.abs(np.asarray(_forward(model, IDS)) - expected).max() <= 1e-4
    assert np.abs(np.asarray(_forward(lora.merge_lora(model), IDS)) - expected).max() <= 1e-4
    assert not any("lora" in name for name in mlx_jax.model_arrays(model))


def test_hf_peft_adapter_gives_the_hf_logits(tiny_pair, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    _, directory, _ = tiny_pair("tiny-qwen2")  # q/k/v biases, tied embeddings
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.manual_seed(2)
    hf_peft = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear", init_lora_weights=False))
    hf_peft.save_pretrained(tmp_path / "adapter")
    model = lora.load_lora(mlx_jax.load_model(directory), tmp_path / "adapter")
    with torch.no_grad():
        expected = hf_peft(input_ids=torch.tensor(IDS)).logits.numpy()
    assert np.abs(np.asarray(_forward(model, IDS)) - expected).max() <= 1e-4


def test_lora_training_updates_only_a_and_b_like_torch(tiny_pair, tmp_path, lm_batch):
    torch_model, directory, _ = tiny_pair("tiny-llama")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    peft_model = _peft(torch_model, **config)
    peft_model.save_pretrained(tmp_path / "start")
    model = lora.load_lora(mlx_jax.load_model(directory), tmp_path / "start")
    batch = lm_batch()
    # gradients of the LoRA weights equal torch autograd's
    loss = peft_model(**{k: torch.tensor(v) for k, v in batch.items()})
    loss.backward()
    expected = {f"{n.replace('.default', '')}": p.grad.numpy()
                for n, p in peft_model.base_model.model.named_parameters() if p.requires_grad}
    state = create_train_state(model, adamw(1e-3, 5), trainable=lora.LoraParam)
    jax_loss, _, grads = jax.jit(loss_and_grads)(state, batch)
    ours = {param_name(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(grads)}
    assert ours.keys() == expected.keys() and len(ours) == 12
    assert abs(float(jax_loss) - loss.item()) <= 1e-5
    assert max(float(np.abs(ours[k] - expected[k]).max()) for k in ours) <= 1e-5
    # training moves A and B only, and the saved adapter loads in torch to the same logits
    base_before = mlx_jax.model_arrays(mlx_jax.load_model(directory))
    lora_before = lora.lora_arrays(model)
    losses = train(model, [batch] * 4, steps=4, lr=1e-2, trainable=lora.LoraParam)
    assert losses[-1] < losses[0]
    after = {param_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    assert all(np.array_equal(after[k], v) for k, v in base_before.items())
    assert all(not np.array_equal(v, lora.lora_arrays(model)[k]) for k, v in lora_before.items())
    with pytest.raises(ValueError, match="carries a LoRA adapter: merge it first"):
        mlx_jax.save_model(model, tmp_path / "full")
    lora.save_lora(model, tmp_path / "trained")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "trained")
    assert np.abs(np.asarray(_forward(model, IDS)) - _torch_logits(reloaded)).max() <= 1e-4


def test_a_fresh_adapter_leaves_the_output_unchanged(tiny_pair):
    _, _, reference = tiny_pair("tiny-mixtral")
    model = mlx_jax.load_model(reference.source_dir)
    names = lora.apply_lora(model, lora.LoraConfig(target_modules=["w1", "w3", "o_proj"], r=2))
    assert len(names) == 2 * (4 * 2 + 1)  # 2 layers x (4 experts x 2 + o_proj)
    assert len(lora.lora_arrays(model)) == 2 * len(names)
    assert np.array_equal(np.asarray(_forward(model, IDS)), np.asarray(_forward(reference, IDS)))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.apply_lora(model, lora.LoraConfig(target_modules=["q_proj"]))


def test_bad_adapters_are_refused_by_name(tiny_pair, tmp_path):
    torch_model, directory, _ = tiny_pair("tiny-llama")
    model = mlx_jax.load_model(directory)
    with pytest.raises(ValueError, match=r"matches no linear module.*down_proj, gate_proj, k_proj"):
        lora.apply_lora(model, lora.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="output head"):
        lora.apply_lora(model, lora.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="layers_to_transform cannot be used when target_modules"):
        lora.LoraConfig(target_modules="all-linear", layers_to_transform=[1])  # PEFT refuses it
    _peft(torch_model, r=4, lora_alpha=8, target_modules=["q_proj"]).save_pretrained(tmp_path / "a")

    def edited(name, config_edit=None, tensors_edit=None):
        out = tmp_path / name
        shutil.copytree(tmp_path / "a", out)
        if config_edit:
            config = json.loads((out / "adapter_config.json").read_text())
            (out / "adapter_config.json").write_text(json.dumps({**config, **config_edit}))
        if tensors_edit:
            save_file(tensors_edit(load_file(out / "adapter_model.safetensors")),
                      out / "adapter_model.safetensors")
        return out

    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    cases = [
        (edited("r8", {"r": 8}), r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight .* has shape \(4, 64\), but .* expect \(8, 64\)"),
        (edited("more", {"target_modules": ["q_proj", "k_proj"]}), r"missing \['.*k_proj"),
        (edited("extra", tensors_edit=lambda t: {**t, "base_model.model.x.lora_A.weight": t[key]}),
         r"unexpected \['base_model.model.x.lora_A.weight'\]"),
        (edited("dora", {"use_dora": True}), r"does not support: \{'use_dora': True\}"),
        (edited("ia3", {"peft_type": "IA3"}), "is a IA3 adapter"),
        (edited("none", {"target_modules": None}), "has no target_modules"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            lora.load_lora(model, path)
        assert getattr(model, "lora_config", None) is None
    assert not lora.lora_arrays(model)  # nothing was half-applied
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        lora.load_lora(model, directory)
