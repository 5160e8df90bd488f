"""The Flax Transformer equals the torch zoo: same registry names, same weights, same logits.

Tolerances: max |logits difference| <= 1e-4 for tiny random fp32 models (differences are
float rounding, ~3e-7 observed), <= 2e-3 for the built-in model (logits up to ~31 in size:
6.5e-5 relative). Observed there: ~1.5e-4 on an Intel AVX-512 machine, 1.1-1.3e-3 on an AMD
AVX2 one, where XLA's and MKL's fp32 GEMMs round differently: at the worst position (the token
after the first real one, whose activations are the model's largest) a float64 torch forward is
8.8e-4 from JAX's logits and 2.1e-4 from torch's fp32 ones; at the other positions JAX and
torch differ by at most 2.2e-4.
"""

import numpy as np
import pytest
import torch
from flax import nnx

import mlx_jax
from mlx_core import build_model, registry, save_model
from mlx_core.config import HF_MODEL_TYPES
from mlx_core.plugins import load_plugins
from mlx_core.presets import get_preset


def _batch(vocab: int, batch: int = 2, length: int = 19, seed: int = 0):
    """Random ids and a mask with left padding in row 1 (the layout generation uses)."""
    ids = np.random.RandomState(seed).randint(0, vocab, (batch, length))
    mask = np.ones((batch, length), np.int64)
    mask[1, :6] = 0
    return ids, mask


# Jitted: one compile per shape is much faster than running each op eagerly.
_jax_logits = nnx.jit(lambda model, ids, mask: model(ids, attention_mask=mask))


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask)).numpy()


def test_every_zoo_architecture_has_a_flax_backend():
    load_plugins()
    for model_type in HF_MODEL_TYPES:
        assert {"torch", "flax"} <= set(registry.architectures.get(model_type)), model_type
    config = get_preset("tiny-mixtral")
    builder = registry.architectures.get(config.model_type)["flax"]
    model = nnx.eval_shape(lambda: builder(config))  # shapes only: fast
    assert isinstance(model, mlx_jax.Transformer) and model.config == config


def test_logits_match_torch_zoo(tiny_pair, tiny_preset):
    torch_model, _, jax_model = tiny_pair(tiny_preset)
    ids, mask = _batch(torch_model.config.vocab_size)
    right_padded = mask[:, ::-1].copy()  # padding after the text, as in training batches
    for m in (None, mask, right_padded):
        ref = _torch_logits(torch_model, ids, m)
        out = np.asarray(_jax_logits(jax_model, ids, m))
        assert out.shape == ref.shape == (2, 19, torch_model.config.vocab_size)
        assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.parametrize("preset,scaling", [
    ("tiny-llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    ("tiny-llama", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5}),
    ("tiny-llama-dynamic-rope", None), ("tiny-phi3-longrope", None),
], ids=["yarn", "yarn-mscale", "dynamic", "longrope"])
def test_rope_scaling_matches_torch_zoo(preset, scaling, tmp_path):
    """YaRN's ramped frequencies and its attention factor on cos/sin: one shared table, the
    same logits. Dynamic NTK and LongRoPE (switching at 16 tokens): the table each length
    picks inside the traced forward, shorter and longer than the switch."""
    torch.manual_seed(0)
    config = get_preset(preset)
    torch_model = build_model(config.replace(rope_scaling=scaling or config.rope_scaling)).eval()
    jax_model = mlx_jax.load_model(save_model(torch_model, tmp_path / "m"))
    for length in (12, 24):
        ids, mask = _batch(torch_model.config.vocab_size, length=length)
        assert np.abs(np.asarray(_jax_logits(jax_model, ids, mask))
                      - _torch_logits(torch_model, ids, mask)).max() <= 1e-4


def test_parameters_equal_the_checkpoint_tensors(tiny_pair):
    torch_model, _, jax_model = tiny_pair("tiny-gpt2")  # GPT-2: the one family renamed on disk
    ours = mlx_jax.model_arrays(jax_model)
    theirs = {k: v.numpy() for k, v in torch_model.state_dict().items() if k != "lm_head.weight"}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


# window; learned positions; multi-head latent attention's cached latents
@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-gpt2", "tiny-deepseek-v3"])
def test_cached_decoding_matches_full_forward(tiny_pair, preset):
    _, _, model = tiny_pair(preset)
    ids, mask = _batch(model.config.vocab_size, length=14)
    full = np.asarray(_jax_logits(model, ids, mask))
    step = nnx.jit(lambda m, ids, mask, cache: m(ids, mask, cache=cache))  # 2 shapes: 2 compiles
    logits, cache = step(model, ids[:, :9], mask[:, :9], model.new_cache(2, 16))
    steps = [np.asarray(logits)]
    for t in range(9, 14):
        logits, cache = step(model, ids[:, t:t + 1], None, cache)
        steps.append(np.asarray(logits))
    assert int(cache.length) == 14
    with pytest.raises(ValueError, match="KV cache full: 17 tokens do not fit in max_length=16"):
        model(ids[:, :3], cache=cache)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-5


@pytest.mark.builtin_model
def test_builtin_model_logits_match_torch_zoo(builtin_pair):
    torch_model, jax_model, _ = builtin_pair
    ids, mask = _batch(torch_model.config.vocab_size, length=12)
    ref = _torch_logits(torch_model, ids, mask)
    out = np.asarray(_jax_logits(jax_model, ids, mask))
    assert np.abs(out - ref).max() <= 2e-3  # fp32 rounding: see the module docstring
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.builtin_model
def test_gguf_file_loads_the_weights_of_the_registered_name(builtin_gguf_path, builtin_pair):
    from_file = mlx_jax.model_arrays(mlx_jax.load_model(builtin_gguf_path))
    from_name = mlx_jax.model_arrays(builtin_pair[1])
    assert from_file.keys() == from_name.keys()
    for name in ("model.embed_tokens.weight", "model.layers.29.self_attn.k_proj.weight"):
        np.testing.assert_array_equal(from_file[name], from_name[name])


@pytest.mark.parametrize("preset,changes", [
    pytest.param("tiny-llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                 id="linear-rope"),
    pytest.param("tiny-llama", {"head_dim": 32, "num_kv_heads": 4},  # head_dim != hidden / heads
                 id="wide-heads"),
    pytest.param("tiny-llama", {"num_kv_heads": 1, "attention_bias": True, "mlp_bias": True,
                                "attention_out_bias": True}, id="mqa-all-biases"),
    # Qwen3-MoE: the routed experts (sorted by expert, grouped matmuls), jitted
    pytest.param("tiny-qwen3-moe", {"norm_topk_prob": False, "mlp_only_layers": ()},
                 id="unnormalised-all-sparse"),  # every layer sparse, weights as routed
    pytest.param("tiny-qwen3-moe", {"num_experts": 6, "num_experts_per_tok": 3, "num_kv_heads": 1,
                                    "tie_word_embeddings": True, "mlp_only_layers": (0,)},
                 id="top3-mqa-tied-dense-first"),
    # DeepSeek: group-limited softmax routing, scaled; plain queries, RoPE pairs not
    # interleaved, YaRN's mscale in the softmax scale, every layer sparse
    pytest.param("tiny-deepseek-v2", {"topk_method": "group_limited_greedy", "n_group": 2,
                                      "topk_group": 1, "routed_scaling_factor": 1.5},
                 id="deepseek-v2-group-limited"),
    pytest.param("tiny-deepseek-v3", {
        "q_lora_rank": None, "rope_interleave": False, "mlp_only_layers": (),
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "mscale": 0.707, "mscale_all_dim": 0.707}},
                 id="deepseek-v3-yarn-plain-q-all-sparse"),
])
def test_config_variants_match_torch_zoo(preset, changes, tmp_path):
    torch.manual_seed(0)
    torch_model = build_model(get_preset(preset).replace(**changes)).eval()
    jax_model = mlx_jax.load_model(save_model(torch_model, tmp_path / "model"))
    ids, mask = _batch(128)
    ref = _torch_logits(torch_model, ids, mask)
    assert np.abs(np.asarray(_jax_logits(jax_model, ids, mask)) - ref).max() <= 1e-4
