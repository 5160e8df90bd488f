"""What runs a model for the harness: score token windows, generate continuations.

One runner per backend, all with the same two calls, so ``MlxLM`` (the harness's request
handling) is written once:

- ``score(rows)``: ``rows`` are ``(tokens, n_scored)``; the model reads ``tokens[:-1]`` and the
  last ``n_scored`` tokens are scored. Returns ``(sum of their log-probabilities, whether each
  was the greedy choice)`` per row.
- ``generate(prompts, options)``: new token ids per prompt (``GenerationOptions``).

``TorchRunner``: the torch zoo model (with a PEFT-format adapter applied), batched and
left-padded, logits only for the scored positions. ``JaxRunner``: the Flax mirror (mlx_jax),
with a LoRA adapter. ``ServeRunner``: the serving engine (mlx_serve): prompts go in as requests
with ``prompt_logprobs``, so its continuous batching and prefix cache do the work; the contexts
several continuations share are sent first, so the others find them cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("torch", "jax", "serve")
# logits rows (positions x batch) one scoring forward may keep: bounds its memory to about
# 512 MiB of float32 logits whatever the vocabulary
LOGIT_BYTES_BUDGET = 2**29


@dataclass
class GenerationOptions:
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)  # stop strings (the text ends before them)
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def check_adapter_dir(adapter: str | Path) -> Path:
    """``adapter`` as a PEFT-format adapter directory, or an error saying what to pass."""
    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist: pass the directory a "
                                "tuning run saved (e.g. runs/lora_finetune/adapter)")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a PEFT-format adapter directory (it has no "
                                "adapter_config.json): pass the 'adapter' directory of a tuning "
                                "run (e.g. runs/lora_finetune/adapter)")
    return path


def _batches(order: list[int], rows, vocab: int, batch_size: int):
    """Consecutive groups of ``order`` (longest first) of at most ``batch_size`` rows whose
    kept logits (rows x longest scored span x vocab) fit ``LOGIT_BYTES_BUDGET``."""
    max_rows = max(1, LOGIT_BYTES_BUDGET // (4 * vocab))
    batch, widest = [], 0
    for i in order:
        n = rows[i][1]
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * max(widest, n) > max_rows):
            yield batch
            batch, widest = [], 0
        batch.append(i)
        widest = max(widest, n)
    if batch:
        yield batch


def _score_in_batches(rows, tokenizer, vocab_size: int, batch_size: int, last_logits
                      ) -> list[tuple[float, bool]]:
    """Score ``rows`` (``(tokens, continuation length)``) longest first in left-padded batches;
    ``last_logits(ids, mask, keep)`` gives a batch's logits at its last ``keep`` positions (a
    torch tensor on the CPU), whatever the backend."""
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    pad = tokenizer.pad_token_id or 0
    for batch in _batches(order, rows, vocab_size, batch_size):
        ids, mask = _left_padded([rows[i][0][:-1] for i in batch], pad)
        logits = last_logits(ids, mask, max(rows[i][1] for i in batch))
        for i, result in zip(batch, _score_logits(logits, [rows[i] for i in batch]), strict=True):
            results[i] = result
    return results


def _left_padded(inputs: list[list[int]], pad: int):
    """``(ids [B, L], mask [B, L])`` as numpy arrays, rows left-padded to the longest."""
    import numpy as np

    width = max(len(x) for x in inputs)
    ids = np.full((len(inputs), width), pad, dtype=np.int64)
    mask = np.zeros((len(inputs), width), dtype=bool)
    for row, x in enumerate(inputs):
        ids[row, width - len(x):] = x
        mask[row, width - len(x):] = True
    return ids, mask


def _score_logits(logits, rows) -> list[tuple[float, bool]]:
    """Per row: from logits ``[B, K, V]`` of the last K positions, its scored tokens' summed
    log-probability (float32 log-softmax, as the harness's ``hf`` model) and greedy match."""
    import torch

    out = []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for row, (tokens, n) in enumerate(rows):
        span = logprobs[row, logprobs.shape[1] - n:]
        targets = torch.tensor(tokens[-n:], dtype=torch.long)
        chosen = span.gather(1, targets[:, None])[:, 0]
        out.append((float(chosen.sum()), bool((span.argmax(-1) == targets).all())))
    return out


DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


class TorchRunner:
    """The torch zoo model (``mlx_core.load_model``), with a PEFT-format adapter
    (``mlx_adapters.PeftModel``: LoRA, DoRA, IA3, ...) when one is given."""

    name = "torch"

    def __init__(self, source: str, tokenizer, *, adapter: str | None = None,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 16):
        from mlx_core import load_model
        from mlx_train.recipes.evaluate import generation_model

        model = load_model(source, dtype=torch_dtype(dtype), device=device)
        if adapter is not None:
            from mlx_adapters.peft_model import PeftModel

            model = PeftModel.from_pretrained(model, check_adapter_dir(adapter))
        self.model = model.eval()
        self.generator = generation_model(self.model)  # the zoo model, adapter layers inside
        self.config = self.generator.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def score(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        import torch

        device = self.generator.device

        def last_logits(ids, mask, keep):
            with torch.inference_mode():
                logits = self.model(torch.from_numpy(ids).to(device),
                                    attention_mask=None if mask.all()
                                    else torch.from_numpy(mask).to(device),
                                    logits_to_keep=keep)
            return logits.cpu()

        return _score_in_batches(rows, self.tokenizer, self.config.vocab_size, self.batch_size,
                                 last_logits)

    def generate(self, prompts: list[list[int]], options: GenerationOptions) -> list[list[int]]:
        """Greedy (or sampled) tokens, batched and left-padded; a batch stops early once every
        row has produced a stop string or an end-of-sequence token."""
        from mlx_core.models.generation import generate_steps

        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        stop_ids = list(self.tokenizer.eos_token_ids) or None
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            done = [False] * len(batch)
            steps = generate_steps(self.generator, [prompts[i] for i in batch],
                                   max_new_tokens=options.max_new_tokens,
                                   temperature=options.temperature, top_k=options.top_k,
                                   top_p=options.top_p, seed=options.seed,
                                   stop_token_ids=stop_ids)
            for step in steps:
                for row, token in enumerate(step.tolist()):
                    if token < 0:
                        done[row] = True
                    elif not done[row]:
                        out[batch[row]].append(token)
                        if options.stop and any(
                                s in self.tokenizer.decode(out[batch[row]]) for s in options.stop):
                            done[row] = True
                if all(done):
                    steps.close()
                    break
        return out

    def close(self) -> None:
        pass


class JaxRunner:
    """The Flax mirror (``mlx_jax.load_model``) with a PEFT-format LoRA adapter
    (``mlx_jax.load_lora``) when one is given; the same weights as the torch zoo."""

    name = "jax"

    def __init__(self, source: str, tokenizer, *, adapter: str | None = None,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 16):
        from mlx_train.extras import require_jax

        mlx_jax = require_jax()
        import jax.numpy as jnp

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        self.model = mlx_jax.load_model(source, dtype=getattr(jnp, dtype))
        if adapter is not None:
            mlx_jax.load_lora(self.model, check_adapter_dir(adapter))
        self.config = self.model.config
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def score(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        import numpy as np
        import torch

        def last_logits(ids, mask, keep):
            logits = self.model(ids, attention_mask=None if mask.all() else mask)[:, -keep:]
            return torch.from_numpy(np.array(logits, dtype=np.float32))  # a writable copy

        return _score_in_batches(rows, self.tokenizer, self.config.vocab_size, self.batch_size,
                                 last_logits)

    def generate(self, prompts: list[list[int]], options: GenerationOptions) -> list[list[int]]:
        """Jitted generation (``mlx_jax.generate``) of ``max_new_tokens`` per batch; stop
        strings are applied to the text afterwards."""
        import mlx_jax

        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        seed = options.seed if options.seed is not None else 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            tokens = mlx_jax.generate(self.model, [prompts[i] for i in batch],
                                      max_new_tokens=options.max_new_tokens,
                                      temperature=options.temperature, top_k=options.top_k,
                                      top_p=options.top_p, seed=seed,
                                      stop_token_ids=list(self.tokenizer.eos_token_ids) or None)
            for i, row in zip(batch, tokens, strict=True):
                out[i] = row
        return out

    def close(self) -> None:
        pass


class ServeRunner:
    """The serving engine (``mlx_serve.LLM``) over the model, with a LoRA adapter served per
    request when one is given. ``engine_options`` go to ``LLM`` (``block_size``,
    ``max_num_seqs``, ``kv_cache_memory``, ``enable_prefix_caching``, ...)."""

    name = "serve"
    ADAPTER = "adapter"

    def __init__(self, source: str, tokenizer, *, adapter: str | None = None,
                 dtype: str = "float32", device: str = "cpu", batch_size: int = 16,
                 **engine_options):
        try:
            from mlx_serve import LLM
        except ImportError:
            raise ImportError("backend=serve needs mlx-serve: pip install 'mlx-train[serve]' (from "
                              "a checkout: pip install -e packages/serve)") from None
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        loras = {self.ADAPTER: str(check_adapter_dir(adapter))} if adapter is not None else None
        self.llm = LLM(source, tokenizer=tokenizer, dtype=dtype, device=device, loras=loras,
                       **engine_options)
        self.lora = self.ADAPTER if adapter is not None else None
        self.config = self.llm.engine.model.config
        self.max_model_len = self.llm.engine.max_model_len
        self.tokenizer = tokenizer

    def score(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Each row is one request scoring its last ``n`` tokens. Rows that share everything
        but those tokens (the choices of a multiple-choice question) are sent in two waves:
        one per shared context first, then the rest, which find the context cached."""
        from mlx_serve import SamplingParams

        first_of_context: dict[tuple[int, ...], int] = {}
        for i, (tokens, n) in enumerate(rows):
            first_of_context.setdefault(tuple(tokens[:-n]), i)
        leaders = sorted(first_of_context.values())
        chosen = set(leaders)
        followers = [i for i in range(len(rows)) if i not in chosen]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for wave in (leaders, followers):
            if not wave:
                continue
            params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1,
                                     prompt_logprobs_start=len(rows[i][0]) - rows[i][1])
                      for i in wave]
            outputs = self.llm.generate([rows[i][0] for i in wave], params, lora=self.lora)
            for i, out in zip(wave, outputs, strict=True):
                tokens, n = rows[i]
                entries = out.prompt_logprobs[len(tokens) - n:]
                values = [e[t] for e, t in zip(entries, tokens[-n:], strict=True)]
                greedy = all(e[t] >= max(e.values()) for e, t in zip(entries, tokens[-n:],
                                                                     strict=True))
                results[i] = (float(sum(values)), greedy)
        return results

    def generate(self, prompts: list[list[int]], options: GenerationOptions) -> list[list[int]]:
        from mlx_serve import SamplingParams

        params = SamplingParams(temperature=options.temperature, top_p=options.top_p,
                                top_k=options.top_k, seed=options.seed,
                                max_tokens=options.max_new_tokens,
                                stop=[s for s in options.stop if s] or None)
        outputs = self.llm.generate(prompts, params, lora=self.lora)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def close(self) -> None:
        pass


RUNNERS = {"torch": TorchRunner, "jax": JaxRunner, "serve": ServeRunner}


def make_runner(backend: str, source: str, tokenizer, **options):
    if backend not in RUNNERS:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(RUNNERS)}")
    return RUNNERS[backend](source, tokenizer, **options)
