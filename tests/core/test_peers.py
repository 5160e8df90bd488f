"""``mlx bench quant``'s peers: a peer that is not installed is listed with its install command,
never an error (the runs themselves are in tests/core/test_quantize.py's bench test)."""

import importlib.util

from mlx_core.transforms import peers


def test_a_missing_peer_is_skipped_with_its_install_command(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr("mlx_core.sources.gguf_file", lambda source: tiny_model_dir / "x.gguf")
    out = peers.run(str(tiny_model_dir), [1, 2, 3], 4, 1, 1)
    assert out == {"ctranslate2": {"skipped": "not installed: pip install ctranslate2"},
                   "llama.cpp": {"skipped": "not installed: pip install llama-cpp-python  "
                                            "(builds llama.cpp from source: minutes)"}}


def test_a_peer_that_crashes_is_reported_as_failed(tmp_path):
    """A peer runs in a process of its own: native code that dies takes only that process."""
    out = peers._in_own_process("no_such_engine", tmp_path, [1], 1, 1, 1)
    assert out["no_such_engine"]["failed"].startswith("exit status 1: KeyError")
