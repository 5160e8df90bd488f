"""``mlx generate --backend serve`` (and ``--tensor-parallel-size N``, which runs on it): one
prompt through the serving engine, its tokens yielded as the engine steps, in the shape of
``mlx_core.stream_generate`` so that ``mlx generate`` streams and decodes them as its own."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from mlx_serve.llm import LLM
from mlx_serve.sampling_params import SamplingParams


def load(model: str, *, tensor_parallel_size: int = 1, quantization: str | None = None):
    """``(the engine's LLM, stream_generate)`` for ``model``; ``LLM.close()`` stops its
    tensor-parallel workers, if any."""
    llm = LLM(model, quantization=quantization, tensor_parallel_size=tensor_parallel_size)
    return llm, stream_generate


def stream_generate(llm: LLM, prompt_ids: Sequence[int], *, stop_token_ids=None,
                    max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_token_ids=list(stop_token_ids or []))
    engine = llm.engine
    request_id, emitted = engine.add_request([int(t) for t in prompt_ids], params), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                ids = out.outputs[0].token_ids
                yield from ids[emitted:]
                emitted = len(ids)
