"""The harness's model classes: ``mlx`` (the zoo on torch, or on JAX with ``backend=jax``) and
``mlx-serve`` (the serving engine), each with an optional PEFT-format adapter.

``MlxLM`` handles the harness's requests the way its own ``hf`` model does, so scores compare
one to one: the same tokenization (context and continuation encoded together, then split), the
same left truncation to ``max_length``, the same rolling windows for
``loglikelihood_rolling``, the same stop-string handling for ``generate_until``. What runs the
model is a runner (``mlx_train.lm_eval.runners``).

Model arguments (``--model_args`` in lm_eval, options of ``mlx eval``): ``pretrained`` (a
registered name such as ``smollm2-135m-instruct``, an HF-format directory, a ``.gguf`` file),
``adapter`` (a PEFT-format adapter directory), ``backend`` (``torch``, ``jax``; ``mlx-serve``
is ``serve``), ``dtype``, ``batch_size``, ``max_length``, ``max_gen_toks``; ``mlx-serve`` also
takes the engine's options (``block_size``, ``max_num_seqs``, ``kv_cache_memory``, ...).
"""

from __future__ import annotations

import logging

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mlx_train.lm_eval.runners import GenerationOptions, make_runner

logger = logging.getLogger("mlx_train.lm_eval")


def _int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _device(device: str | None) -> str:
    """The torch device: lm_eval's CLI asks for ``cuda`` by default, which falls back to the
    CPU on a machine without one."""
    import torch

    if not device:
        return "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%s is not available here: running on the CPU", device)
        return "cpu"
    return str(device)


class MlxLM(TemplateLM):
    """lm_eval's ``LM`` over an mlx model; registered as ``mlx``."""

    backend = "causal"  # TemplateLM: context + continuation are encoded together
    default_backend = "torch"

    def __init__(self, pretrained: str = "smollm2-135m-instruct", adapter: str | None = None,
                 backend: str | None = None, dtype: str = "float32", batch_size=16,
                 max_length=None, max_gen_toks=256, device: str | None = None,
                 max_batch_size=None, **engine_options):
        super().__init__()
        from mlx_core import load_tokenizer

        runner_backend = backend or self.default_backend
        if runner_backend != "serve" and engine_options:
            raise TypeError(f"unknown model arguments {sorted(engine_options)} for the "
                            f"{runner_backend} backend; the serving engine's options need "
                            "backend=serve (lm_eval --model mlx-serve)")
        if str(batch_size).startswith("auto"):  # lm_eval's auto-detection: keep the default
            batch_size = 16
        self.pretrained = str(pretrained)
        self.adapter = None if adapter in (None, "", "None") else str(adapter)
        self.mlx_tokenizer = load_tokenizer(pretrained)
        self.tokenizer = self.mlx_tokenizer.hf  # what TemplateLM.chat_template reads
        self.runner = make_runner(runner_backend, self.pretrained, self.mlx_tokenizer,
                                  adapter=self.adapter, dtype=dtype, device=_device(device),
                                  batch_size=_int(batch_size, "batch_size"), **engine_options)
        self._max_length = _int(max_length, "max_length")
        self._max_gen_toks = _int(max_gen_toks, "max_gen_toks")

    # -- what the harness asks about the model -------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS, or EOS where there is none (as ``hf``)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        length = self.runner.config.max_position_embeddings
        limit = getattr(self.runner, "max_model_len", None)
        # the engine needs room for the one token it samples after a scored prompt
        return min(length, limit - 1) if limit else length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        """The tokenizer's own default for special tokens, none where the text already starts
        with the prefix token (as ``hf``)."""
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(
                string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **options)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt)

    # -- requests ------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """``requests``: ``((context, continuation), context ids, continuation ids)``; each
        window is cut from the left to ``max_length`` inputs, as ``hf`` cuts it."""
        rows = []
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc:
                raise ValueError("a loglikelihood request needs a non-empty context and "
                                 "continuation")
            if len(continuation_enc) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation_enc)} tokens is longer "
                                 f"than max_length={self.max_length}")
            tokens = (context_enc + continuation_enc)[-(self.max_length + 1):]
            rows.append((tokens, len(continuation_enc)))
        results = self.runner.score(rows)
        for (request, _, _), result in zip(requests, results, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood over disjoint windows of ``max_length`` tokens, the
        first conditioned on the prefix token (``lm_eval.utils.get_rolling_token_windows``)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation options, each group run as one batch of
        prompts; the text ends before the first stop string (the end-of-sequence token's text
        is one, as in ``hf``)."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in "
                                 f"max_length={self.max_length}")
            options = GenerationOptions(
                max_new_tokens=max_new, stop=until,
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample")
                else 0.0,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                seed=kwargs.get("seed"))
            prompts = [self.tok_encode(requests[i].args[0],
                                       left_truncate_len=self.max_length - max_new)
                       for i in indices]
            outputs = self.runner.generate(prompts, options)
            for i, tokens in zip(indices, outputs, strict=True):
                text = postprocess_generated_text(self.tokenizer.decode(tokens,
                                                                        skip_special_tokens=True),
                                                  stop=until, think_end_token=None)
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def get_model_info(self) -> dict:
        return {"model": self.pretrained, "adapter": self.adapter, "backend": self.runner.name}


class MlxServeLM(MlxLM):
    """``MlxLM`` on the serving engine (``backend=serve``); registered as ``mlx-serve``."""

    default_backend = "serve"


__all__ = ["MlxLM", "MlxServeLM"]
