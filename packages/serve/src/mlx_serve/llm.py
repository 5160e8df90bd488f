"""Offline batched inference: ``LLM(model).generate(prompts, SamplingParams(...))``, as in vLLM."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from mlx_serve.config import EngineConfig
from mlx_serve.engine import LLMEngine, default_dtype
from mlx_serve.outputs import EmbeddingOutput, EmbeddingRequestOutput, RequestOutput
from mlx_serve.sampling_params import SamplingParams

PromptType = str | list[int] | dict


def _engine_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(EngineConfig)}


class LLM:
    """An engine over one model.

    ``model``: a registered name (default: the built-in ``smollm2-135m-instruct``), an HF-format
    directory, a ``.gguf`` file, or an already built zoo model (then pass ``tokenizer``).
    Engine options (``EngineConfig``): ``block_size``, ``num_blocks``, ``kv_cache_memory``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``max_model_len``, ``enable_prefix_caching``,
    ``enable_chunked_prefill``, ``scheduling_policy``, ``seed``, ``max_loras``,
    ``max_lora_rank``, ``speculative_config`` (vLLM's dict for n-gram drafts, mlx_serve.spec_decode),
    ``quantization`` (``"int8"``, ``"int4"``, ``"w8a8"``, ...: the weights are quantized at start;
    ``"gguf"``: a GGUF source's tensors as shipped; LoRA adapters stay in full precision). ``loras``: ``{name: PEFT LoRA directory}`` to load at start (more with
    ``add_lora``); ``generate(..., lora=name)`` picks one per call or per prompt.
    ``tensor_parallel_size=N`` splits the model over N processes this one starts
    (``mlx_serve.tensor_parallel``; a zoo model passed in is split in place).
    """

    def __init__(self, model: str | nn.Module = "smollm2-135m-instruct", *, tokenizer=None,
                 dtype="float32", device: str = "cpu", loras: dict[str, str] | None = None,
                 **engine_options):
        unknown = set(engine_options) - _engine_fields()
        if unknown:
            raise TypeError(f"unknown LLM options {sorted(unknown)}; engine options are "
                            f"{sorted(_engine_fields())}")
        config = EngineConfig(**engine_options)  # bad options fail before a model loads
        if isinstance(model, nn.Module):
            if model.dtype != default_dtype(dtype):
                model = model.to(default_dtype(dtype))
        else:
            from mlx_core import load_model, load_tokenizer

            source = model
            model = load_model(source, dtype=default_dtype(dtype), device=device,
                               quantization=config.quantization)
            tokenizer = tokenizer or load_tokenizer(model.source_dir)
        self.engine = LLMEngine(model, tokenizer, config)
        for name, path in (loras or {}).items():
            self.engine.add_lora(name, path)

    def reset_prefix_cache(self) -> None:
        self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Stop the tensor-parallel workers (``tensor_parallel_size > 1``; otherwise nothing to
        do); also done at interpreter exit. ``with LLM(...) as llm:`` closes at the end."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_lora(self, name: str, path) -> None:
        self.engine.add_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: Sequence[int] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; outputs in the prompts' order.

        A prompt is text, a list of token ids, or ``{"prompt_token_ids": [...]}`` (or
        ``{"prompt": "..."}``). ``sampling_params`` is one for all or one per prompt; ``lora``
        (a loaded adapter's name, None for the base model) too.
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt(p) for p in prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts: give "
                                 "one for all or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"{len(loras)} adapters for {len(prompts)} prompts: give one name "
                             "for all or one per prompt")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                ids.append(self.engine.add_request(
                    prompt, p, priority=priority[i] if priority is not None else 0,
                    lora_name=loras[i]))
            return self._run(ids)
        except BaseException:
            for request_id in ids:  # leave the engine empty, whatever went wrong
                self.engine.abort_request(request_id)
            self.engine.step()
            raise

    def embed(self, prompts: PromptType | Sequence[PromptType]) -> list[EmbeddingRequestOutput]:
        """One embedding per prompt (text, token ids or a prompt dict), in order: the final
        hidden states pooled as ``EngineConfig.pooling`` says (``last`` or ``mean``), unit
        length (``mlx_serve.embedding``)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        vectors, token_lists = self.engine.embed([_prompt(p) for p in prompts])
        return [EmbeddingRequestOutput(str(i), ids, EmbeddingOutput(v.tolist()))
                for i, (ids, v) in enumerate(zip(token_lists, vectors, strict=True))]

    def chat(self, messages, sampling_params: SamplingParams | None = None, *,
             add_generation_prompt: bool = True, lora: str | None = None) -> list[RequestOutput]:
        """One conversation (a list of ``{"role", "content"}``) or a list of them, through the
        tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        return self.generate(prompts, sampling_params, lora=lora)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in request_ids]


def _prompt(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    return prompt
