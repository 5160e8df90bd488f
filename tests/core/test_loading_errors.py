"""Bad input: clear errors naming the file, tensor or name; nothing half-written."""

import json

import pytest
import torch

from mlx_core import UnknownNameError, load_model, save_model, sources
from mlx_core.models.loading import build_model
from mlx_core.paths import atomic_directory
from mlx_core.presets import get_preset


@pytest.fixture
def tiny_dir(tmp_path):
    torch.manual_seed(0)
    return save_model(build_model(get_preset("tiny-llama")), tmp_path / "tiny")


def test_round_trip_through_save_and_load(tiny_dir):
    model = load_model(tiny_dir)
    again = load_model(save_model(model, tiny_dir.parent / "again"))
    ids = torch.randint(0, 128, (1, 9))
    assert torch.equal(model(ids), again(ids))


def test_sharded_save_loads_back(tiny_dir):
    model = load_model(tiny_dir)
    out = save_model(model, tiny_dir.parent / "sharded", max_shard_size=50_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    ids = torch.randint(0, 128, (1, 9))
    assert torch.equal(load_model(out)(ids), model(ids))


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="smollm2-135m-instruct"):
        load_model("smollm2-135m")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_missing_weights_file_is_named(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights in .*tiny"):
        load_model(tiny_dir)


def test_corrupt_weights_file_is_named(tiny_dir):
    path = tiny_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: it is corrupt or truncated"):
        load_model(tiny_dir)


def test_shape_mismatch_names_tensor_and_both_shapes(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["intermediate_size"] = 100
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight .* \(96, 64\).*\(100, 64\)"):
        load_model(tiny_dir)


def test_missing_tensor_is_named(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tiny_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing .*model\.layers\.2\."):
        load_model(tiny_dir)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as out:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("conversion failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_pull_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_HOME", str(tmp_path))

    def broken_fetch(workdir):
        bad = workdir / "broken.gguf"
        bad.write_bytes(b"not a gguf file")
        return bad

    source = sources.ModelSource(name="broken-model", preset="tiny-llama", origin="test",
                                 fetch=broken_fetch)
    sources.registry.model_sources.register("broken-model", source)
    try:
        with pytest.raises(ValueError, match="broken.gguf"):
            sources.pull("broken-model")
        assert not source.cache_dir.exists()
        assert not any((tmp_path / "models").iterdir())
    finally:
        sources.registry.model_sources._items.pop("broken-model")


def test_save_refuses_to_overwrite_and_keeps_old(tiny_dir):
    before = (tiny_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model(load_model(tiny_dir), tiny_dir)
    assert (tiny_dir / "model.safetensors").read_bytes() == before
