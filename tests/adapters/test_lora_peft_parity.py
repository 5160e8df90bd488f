"""LoRA against HF PEFT: adapters cross-load in both directions with the same logits (1e-5,
fp32), on HF transformers models and on zoo models; merge/unmerge/disable invariants."""

import pytest
import torch
import transformers
from peft import LoraConfig as HFLoraConfig
from peft import PeftModel as HFPeftModel
from peft import get_peft_model as hf_get_peft_model

import mlx_core
from mlx_adapters import LoraConfig, PeftModel, get_peft_model
from mlx_core import load_model

from .helpers import (
    TINY_LLAMA,
    assert_base_restored,
    loss_and_grads_under_autocast,
    save_tiny_llama,
    train_losses,
)

pytestmark = pytest.mark.hf_parity

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny_llama(tmp_path / "base")


def _hf(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def _logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear", r".*\.mlp\.(up|down)_proj"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_hf_peft_adapter_loads_into_ours(hf_dir, tmp_path, targets, use_rslora):
    torch.manual_seed(1)
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=use_rslora))
    theirs.save_pretrained(tmp_path / "adapter")
    for base in (_hf(hf_dir), load_model(hf_dir)):  # an HF model and the zoo model
        ours = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert (_logits(ours) - _logits(theirs)).abs().max() < 1e-5


def _assert_all_linear_adapter_matches_peft(hf, tmp_path, targets="all-linear"):
    """A PEFT LoRA over every linear layer of ``hf`` (or over ``targets``), loaded into the zoo
    model of the same checkpoint, gives PEFT's logits (1e-5); and the zoo's own adapter over the
    same targets, loaded into PEFT, gives the zoo's."""
    hf.save_pretrained(tmp_path / "base")
    theirs = hf_get_peft_model(hf.eval(), HFLoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = PeftModel.from_pretrained(load_model(tmp_path / "base"), tmp_path / "adapter").eval()
    assert (_logits(ours) - _logits(theirs.eval())).abs().max() < 1e-5
    if targets == "all-linear":
        return
    mine = get_peft_model(load_model(tmp_path / "base"), LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False)).eval()
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(type(hf).from_pretrained(tmp_path / "base"),
                                         tmp_path / "mine").eval()
    assert (_logits(mine) - _logits(loaded)).abs().max() < 1e-5


def test_peft_adapter_on_qwen3_loads_into_the_zoo(tmp_path):
    """Qwen3's q/k norms sit between the projections LoRA wraps and RoPE: a PEFT adapter over
    every linear layer of an HF Qwen3 gives the same logits on the zoo model (1e-5)."""
    torch.manual_seed(4)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64))
    _assert_all_linear_adapter_matches_peft(hf, tmp_path)


_SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
_DEEPSEEK = dict(num_key_value_heads=4, head_dim=8, kv_lora_rank=16, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=32, n_routed_experts=4,
                 num_experts_per_tok=2, first_k_dense_replace=1)
# family -> (model class, config class, its config, the adapter's targets)
_FAMILIES = {
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config,
               dict(attn_logit_softcapping=2.0, final_logit_softcapping=5.0, **_SLIDING),
               "all-linear"),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig, _SLIDING,
               "all-linear"),
    # PEFT on transformers 5's Qwen3-MoE turns MLP targets into target_parameters on the fused
    # expert tensors (which mlx_adapters does not read): the attention projections, both ways
    "qwen3-moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, mlp_only_layers=[1]),
                  ["q_proj", "k_proj", "v_proj", "o_proj"]),
    # multi-head latent attention's projections (plain queries, or the q bottleneck)
    "deepseek-v2": (transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config,
                    dict(_DEEPSEEK, q_lora_rank=None),
                    ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    "deepseek-v3": (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config,
                    dict(_DEEPSEEK, q_lora_rank=24, n_group=2, topk_group=1),
                    ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_peft_adapter_on_a_family_loads_into_the_zoo(tmp_path, family):
    """Gemma 2 and 3 (scaled embeddings, sandwich norms, a sliding layer shorter than the input;
    Gemma 2's soft-capping), Qwen3-MoE (routed experts, then a dense layer), DeepSeek-V2/V3
    (LoRA on the latent attention's projections): a PEFT adapter gives the same logits on the
    zoo model (1e-5), and the zoo's adapter on PEFT's."""
    torch.manual_seed(5)
    model_class, config_class, extra, targets = _FAMILIES[family]
    hf = model_class(config_class(**{**dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64),
        **extra}))
    _assert_all_linear_adapter_matches_peft(hf, tmp_path, targets)


@pytest.mark.parametrize("preset,targets", [("tiny-mixtral", ["w1", "w2", "q_proj"]),
                                            ("tiny-qwen3-moe", ["gate_proj", "down_proj"])])
def test_lora_on_experts_trains_and_merges(preset, targets):
    """Experts are linear layers under their checkpoint names: an adapter on them runs the
    experts one by one, trains every LoRA weight, and merged (the grouped matmuls again) gives
    the same logits (1e-5)."""
    torch.manual_seed(0)
    model = get_peft_model(mlx_core.build_model(mlx_core.get_preset(preset)), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    model(IDS, labels=IDS).backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts.3." in n for n in trained)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    adapted = _logits(model.eval())
    assert (_logits(model.merge_and_unload()) - adapted).abs().max() < 1e-5


def test_our_adapter_loads_into_hf_peft(hf_dir, tmp_path):
    torch.manual_seed(2)
    ours = get_peft_model(load_model(hf_dir), LoraConfig(
        r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path / "adapter")
    theirs = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter").eval()
    assert (_logits(ours.eval()) - _logits(theirs)).abs().max() < 1e-5


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
         layers_to_transform=[1]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=0)],
    ids=["names", "layers-list", "layer-int"])
def test_parameter_names_match_peft(hf_dir, tmp_path, config):
    config = dict(r=4, lora_alpha=8, **config)
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config))
    for base in (_hf(hf_dir), load_model(hf_dir)):
        ours = get_peft_model(base, LoraConfig(init_lora_weights=False, **config))
        assert set(ours.state_dict()) == set(theirs.state_dict())
        assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
            {n for n, p in theirs.named_parameters() if p.requires_grad}
    ours.save_pretrained(tmp_path / "adapter")  # the zoo model's: HF PEFT targets the same layers
    loaded = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "adapter").eval()
    assert (_logits(ours.eval()) - _logits(loaded)).abs().max() < 1e-5


def test_rank_and_alpha_patterns_follow_peft(hf_dir, tmp_path):
    """PEFT's rule (the first pattern p for which ``(.*\\.)?(p)$`` matches, regexes included),
    checked against PEFT on the same model: the ranks of every lora_A, then the logits. (PEFT
    saves the patterns sorted by key, so patterns that overlap are given here in that order.)"""
    torch.manual_seed(3)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                  rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6, "v_.*": 3},
                  alpha_pattern={r"model\.layers\.0\.mlp\.down_proj": 5, "v_proj": 7})
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(init_lora_weights=False, **config))
    ours = get_peft_model(load_model(hf_dir), LoraConfig(init_lora_weights=False, **config))
    shapes = {n: tuple(p.shape) for n, p in theirs.named_parameters() if "lora_A" in n}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters() if "lora_A" in n} == shapes
    assert {s[0] for s in shapes.values()} == {2, 3, 4, 6}
    theirs.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model(hf_dir), tmp_path / "adapter").eval()
    assert (_logits(loaded) - _logits(theirs.eval())).abs().max() < 1e-5


def test_layers_to_transform_with_a_str_target_is_refused_as_in_peft():
    for targets in ("all-linear", r".*q_proj"):
        with pytest.raises(ValueError, match="layers_to_transform cannot be used when "
                                             "target_modules is a str"):
            LoraConfig(target_modules=targets, layers_to_transform=[1])
        with pytest.raises(ValueError, match="layers_to_transform"):
            HFLoraConfig(target_modules=targets, layers_to_transform=[1])
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        LoraConfig(target_modules=["q_proj"], layers_pattern="layers")


def test_get_base_model_is_the_wrapped_model_as_in_peft(hf_dir):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config))
    for base in (_hf(hf_dir), load_model(hf_dir)):
        ours = get_peft_model(base, LoraConfig(**config))
        assert ours.get_base_model() is base
    assert type(theirs.get_base_model()) is transformers.LlamaForCausalLM


def test_merge_unmerge_disable_invariants(hf_dir):
    base = load_model(hf_dir)
    reference = _logits(base).clone()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(3)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False)).eval()
    adapted = _logits(model)
    assert (adapted - reference).abs().max() > 1e-3  # the adapter does something
    with model.disable_adapter():
        assert torch.equal(_logits(model), reference)
    model.merge_adapter()
    assert (_logits(model) - adapted).abs().max() < 1e-5
    model.unmerge_adapter()
    assert_base_restored(model, before)  # bit for bit: unmerge restores the kept original
    merged = model.merge_and_unload()
    assert (_logits(merged) - adapted).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_several_adapters_switch_and_delete(hf_dir):
    torch.manual_seed(4)
    model = get_peft_model(load_model(hf_dir), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)).eval()
    first = _logits(model)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj"],
                                          init_lora_weights=False))
    assert torch.equal(_logits(model), first)  # adding does not activate
    model.set_adapter("other")
    second = _logits(model)
    assert (second - first).abs().max() > 1e-3
    assert all("other" in n for n, p in model.named_parameters() if p.requires_grad)
    model.delete_adapter("other")
    assert model.active_adapter == "default" and torch.equal(_logits(model), first)


def test_only_adapters_train_and_the_loss_goes_down(hf_dir):
    model = get_peft_model(load_model(hf_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    losses = train_losses(model, IDS, steps=10)
    assert losses[-1] < losses[0] - 0.1


def test_bad_input_names_the_problem(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="q_proj.*v_proj|k_proj"):
        get_peft_model(load_model(hf_dir), LoraConfig(target_modules=["query"]))
    torch.manual_seed(5)
    get_peft_model(load_model(hf_dir), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "r4")
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "hidden_size": 32}))
    with pytest.raises(ValueError, match=r"lora_A\.weight .* \(4, 64\).*\(4, 32\)"):
        PeftModel.from_pretrained(other, tmp_path / "r4")
    with pytest.raises(ValueError, match="bias must be 'none', 'all' or 'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init_lora_weights must be"):
        LoraConfig(init_lora_weights="pissa_niter_x")


def test_cli_methods_inspect_and_merge(hf_dir, tmp_path):
    from typer.testing import CliRunner

    from mlx_core.cli.app import build_app

    torch.manual_seed(6)
    model = get_peft_model(load_model(hf_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                          init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    runner = CliRunner()
    assert "lora" in runner.invoke(build_app(), ["adapters", "methods"]).output
    inspected = runner.invoke(build_app(), ["adapters", "inspect", str(tmp_path / "adapter")])
    assert inspected.exit_code == 0, inspected.output
    assert "LORA" in inspected.output and "1,024" in inspected.output  # 2 layers x (4x64 + 64x4)
    merged = runner.invoke(build_app(), ["adapters", "merge", str(hf_dir), str(tmp_path / "adapter"),
                                         str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (_logits(load_model(tmp_path / "merged")) - _logits(model.eval())).abs().max() < 1e-5


def _perturb(model, seed):
    """Move every adapter parameter (B starts at zero, m at ||W||) as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))


def test_dora_cross_loads_with_hf_peft(hf_dir, tmp_path):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(**config))
    _perturb(theirs, 7)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = PeftModel.from_pretrained(load_model(hf_dir), tmp_path / "theirs").eval()
    assert (_logits(ours) - _logits(theirs.eval())).abs().max() < 1e-5

    mine = get_peft_model(load_model(hf_dir), LoraConfig(**config))
    # at init DoRA is the identity, as in PEFT: m = ||W|| and B = 0
    with torch.no_grad():
        assert torch.allclose(_logits(mine.eval()), _logits(load_model(hf_dir)), atol=1e-6)
    _perturb(mine, 8)
    mine.save_pretrained(tmp_path / "mine")
    loaded = HFPeftModel.from_pretrained(_hf(hf_dir), tmp_path / "mine").eval()
    assert (_logits(loaded) - _logits(mine)).abs().max() < 1e-5


def test_dora_merge_and_unmerge(hf_dir):
    base = load_model(hf_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            use_dora=True))
    _perturb(model, 9)
    model.eval()
    adapted = _logits(model)
    model.merge_adapter()
    assert (_logits(model) - adapted).abs().max() < 1e-5
    model.unmerge_adapter()
    assert_base_restored(model, before)  # bit for bit: unmerge restores the kept original
    assert (_logits(model.merge_and_unload()) - adapted).abs().max() < 1e-5


def test_generate_equals_peft_generate_on_an_hf_model(tmp_path):
    """``peft_model.generate`` runs the base model's HF generate with the adapter layers in
    place: greedy tokens equal HF PEFT's with the same adapter, and the base model's alone
    inside ``disable_adapter()``."""
    base_dir = save_tiny_llama(tmp_path / "base")
    theirs = hf_get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dir),
                                     tmp_path / "adapter").eval()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(input_ids=ids, **options)
        want = theirs.eval().generate(input_ids=ids, **options)
        assert torch.equal(got, want)
        plain = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval().generate(input_ids=ids, **options)
        assert not torch.equal(got, plain)  # the adapter changes the tokens
        with ours.disable_adapter():
            assert torch.equal(ours.generate(input_ids=ids, **options), plain)


def test_generate_says_where_a_zoo_model_generates():
    zoo = get_peft_model(mlx_core.build_model(mlx_core.get_preset("tiny-llama")),
                         LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="mlx_core.generate"):
        zoo.generate(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_under_bf16_autocast_matches_hf_peft(hf_dir, tmp_path, use_dora):
    """Mixed precision (``torch.autocast``, bf16) as HF Trainer's ``bf16=True`` runs it: the same
    loss and adapter gradients as HF PEFT under the same autocast, on an HF model and a zoo one,
    within bf16's precision (fp32 parameters, fp32 gradients)."""
    torch.manual_seed(3)
    theirs = hf_get_peft_model(_hf(hf_dir), HFLoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
        use_dora=use_dora))
    theirs.save_pretrained(tmp_path / "adapter")
    want_loss, want = loss_and_grads_under_autocast(theirs, IDS)
    for base in (_hf(hf_dir), load_model(hf_dir)):
        ours = PeftModel.from_pretrained(base, tmp_path / "adapter", is_trainable=True)
        loss, got = loss_and_grads_under_autocast(ours, IDS)
        assert abs(loss - want_loss) < 2e-2 * abs(want_loss)
        # A and B (and DoRA's magnitude) of every linear of both layers
        assert len(got) == len(want) == 2 * 7 * (3 if use_dora else 2)
        for (name, g), w in zip(sorted(got.items()), [want[n] for n in sorted(got)], strict=True):
            assert g.dtype == torch.float32, name
            assert (g - w).norm() <= 0.05 * w.norm(), name
