"""The step loop: schedule, run the model once, sample, detokenize, finish, report.

``LLMEngine`` is synchronous and single-threaded; the offline ``LLM`` drives it to completion
and the server drives it from one background thread.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from mlx_core.rope_scaling import is_length_dependent, recompute_length, rope_type, table_key
from mlx_core.tokenizer import IncrementalDecoder, Tokenizer
from mlx_serve.block_manager import BlockManager
from mlx_serve.config import EngineConfig
from mlx_serve.lora import LoadedLora, LoraManager
from mlx_serve.model_runner import ModelRunner, kv_bytes_per_block
from mlx_serve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from mlx_serve.sampler import SampledToken, Sampler
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.scheduler import Scheduler
from mlx_serve.sequence import Sequence, SequenceStatus
from mlx_serve.spec_decode import NgramProposer
from mlx_serve.structured import GrammarCompiler
from mlx_serve.tensor_parallel import TensorParallelGroup


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[Sequence] = field(default_factory=list)
    decoders: list[IncrementalDecoder] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.sequences)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


def _quantized(model: nn.Module, config: EngineConfig, tokenizer) -> nn.Module:
    """The model with ``config.quantization`` applied (in place), which then names what the
    model runs: a model quantized before it came here is served as it is. W8A8 calibrates
    SmoothQuant on the shipped calibration text in the tokenizer's ids."""
    done = getattr(model, "quantization", None)
    if config.quantization is None:
        config.quantization = done
    elif done is None:
        from mlx_core.transforms import parse_scheme, quantize
        from mlx_core.transforms.smoothquant import default_calibration

        calibration = (default_calibration(tokenizer)
                       if tokenizer is not None and parse_scheme(config.quantization).name == "w8a8"
                       else None)
        quantize(model, config.quantization, calibration=calibration)
    elif done != config.quantization:
        raise ValueError(f"the model is quantized with {done} already; quantization="
                         f"{config.quantization!r} cannot apply: pass the model in full "
                         "precision, or leave quantization unset")
    return model


class LLMEngine:
    def __init__(self, model: nn.Module, tokenizer: Tokenizer, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        cache_dtype = config.cache_dtype(model.dtype, model.device)  # refused before any work
        self.model = model = _quantized(model.eval(), config, tokenizer)
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or _context_length(model.config)
        # a RoPE whose table depends on the length (dynamic NTK, LongRoPE): per sequence
        self.rope_length_dependent = (model.config.position_kind == "rope"
                                      and is_length_dependent(model.config.rope_scaling))
        self.rope_switch = recompute_length(model.config.model_type, model.config.rope_scaling,
                                            model.config.max_position_embeddings)
        # tensor parallelism: the workers start and every rank (this one too) shards the model;
        # its config then names this rank's KV heads, the most any rank holds (the cache size
        # fits every rank)
        self.parallel = (TensorParallelGroup(model, config) if config.tensor_parallel_size > 1
                         else None)
        num_blocks = config.resolve_num_blocks(
            kv_bytes_per_block(model.config, config.block_size, cache_dtype), self.max_model_len,
            model.device)
        self.blocks = BlockManager(num_blocks, config.block_size,
                                   enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler_config(), self.blocks,
                                   NgramProposer(config.speculative_config, self.max_model_len)
                                   if config.speculative_config is not None else None)
        if self.parallel is not None:
            self.parallel.start(num_blocks)
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.prepack_weights,
                                  config.fuse_projections, self.parallel, cache_dtype=cache_dtype)
        eos = list(tokenizer.eos_token_ids) if tokenizer is not None else []
        if not eos and model.config.eos_token_id is not None:
            configured = model.config.eos_token_id
            eos = [configured] if isinstance(configured, int) else list(configured)
        self.eos_token_ids = eos
        self.sampler = Sampler(eos, seed=config.seed)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size, self.eos_token_ids)
        self.loras = LoraManager(model, config.max_loras, config.max_lora_rank)
        self.runner.loras = self.loras
        self.requests: dict[str, Request] = {}
        self._request_counter = itertools.count()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_draft_tokens = 0  # speculative drafts proposed, and kept
        self.num_accepted_tokens = 0
        self.num_forced_tokens = 0  # structured outputs: appended by jump-forward, not drawn

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0,
                    lora_name: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a prompt (text, or token ids); returns its request id. ``lora_name`` picks a
        loaded LoRA adapter (``add_lora``); None runs the base model."""
        params = params or SamplingParams()
        lora = self._lora(lora_name)
        request_id = request_id if request_id is not None else str(next(self._request_counter))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._check_prompt(ids, params)
        guides = ([self.grammars.matcher(params.guided_decoding) for _ in range(params.n)]
                  if params.guided_decoding is not None else [None] * params.n)
        request = Request(request_id, text, ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seq = Sequence(request_id, ids, params, index=index, priority=priority,
                           lora=lora, arrival_time=arrival, seed=seed)
            seq.guide = guides[index]
            if self.rope_length_dependent:
                self._set_rope_length(seq, len(ids))
            request.sequences.append(seq)
            request.decoders.append(IncrementalDecoder(self.tokenizer, params.skip_special_tokens)
                                    if self.tokenizer is not None else None)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        self.prompt_tokens += len(ids) * params.n
        return request_id

    # -- embeddings -------------------------------------------------------------------------
    def embed(self, prompts: list[str | list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
        """``(embeddings [N, hidden], the inputs' token ids)``: each input (text, or token ids)
        pooled as ``config.pooling`` says (``mlx_serve.embedding``), on the base model. Runs
        between steps (the async engine calls it on its thread); needs no KV blocks."""
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
                       for p in prompts]
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(token_lists):
            if not ids:
                raise ValueError(f"input {i} is empty: give at least one token")
            if max(ids) >= vocab or min(ids) < 0:
                raise ValueError(f"input {i}: token ids must be in [0, {vocab}) for this model")
            if len(ids) > self.max_model_len:
                raise ValueError(f"input {i} has {len(ids)} tokens; this model takes at most "
                                 f"{self.max_model_len}: shorten it")
        return self.runner.embed(token_lists, self.config.pooling), token_lists

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if max(ids) >= vocab or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {vocab}) for this model")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            # found by the server fuzz test: an id past int64 crashed the step loop's sampler
            raise ValueError(f"stop_token_ids must be in [0, {vocab}) for this model")
        if params.prompt_logprobs is not None and params.prompt_logprobs_start >= len(ids):
            raise ValueError(f"prompt_logprobs_start={params.prompt_logprobs_start} is past the "
                             f"prompt's last position ({len(ids) - 1}): score from a position "
                             "inside the prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model takes at most "
                             f"{self.max_model_len} (prompt + output): shorten the prompt")
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_num_batched_tokens="
                             f"{self.config.max_num_batched_tokens}; raise it or enable chunked prefill")
        total = len(ids) + (params.max_tokens or self.max_model_len - len(ids))
        needed = self.blocks.blocks_needed(min(total, self.max_model_len))
        if needed > self.blocks.num_blocks:
            raise ValueError(f"this request needs up to {needed} KV blocks but the cache has only "
                             f"{self.blocks.num_blocks}: lower max_tokens or give the cache more "
                             "memory (kv_cache_memory)")

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are freed. Unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix not in use (vLLM's ``reset_prefix_cache``): later prompts
        compute from scratch, e.g. for a cold-cache measurement."""
        self.blocks.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # -- LoRA adapters ----------------------------------------------------------------------
    def add_lora(self, name: str, path) -> LoadedLora:
        """Load a PEFT-format LoRA adapter directory under ``name`` (what requests ask for)."""
        loaded = self.loras.load(name, path)  # a bad adapter fails here, before any worker
        if self.parallel is not None:  # every rank its share; the path must be on every node
            self.parallel.send(("lora_load", name, str(path)))
        return loaded

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while a request still uses it."""
        self.loras.get(name)
        users = sorted({r.request_id for r in self.requests.values() if not r.finished
                        for s in r.sequences if s.lora is not None and s.lora.name == name})
        if users:
            raise ValueError(f"adapter {name!r} is in use by {len(users)} unfinished request(s) "
                             f"({', '.join(users[:3])}); abort them or wait, then unload")
        self.loras.unload(name)
        if self.parallel is not None:
            self.parallel.send(("lora_unload", name))

    def list_loras(self) -> list[str]:
        return self.loras.names()

    def _lora(self, name: str | None) -> LoadedLora | None:
        if name is None:
            return None
        try:
            return self.loras.get(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; outputs of every request that changed (aborted ones and
        finished ones included, each reported finished exactly once, then forgotten)."""
        step = self.scheduler.schedule()
        touched: dict[str, Request] = {}
        if step:
            logits, due, prompt_logits = self.runner.execute(step.sequences,
                                                             self.blocks.take_pending_copies())
            if prompt_logits is not None:
                _record_prompt_logprobs(prompt_logits)
            for seq, n in step.sequences:
                seq.num_computed_tokens += n - len(seq.draft_token_ids)  # drafts: once kept
                self.blocks.register_full_blocks(seq)
            sampled = self.sampler(logits, due) if due else []
            for seq, tokens in zip(due, sampled, strict=True):
                self.num_draft_tokens += len(seq.draft_token_ids)
                self.num_accepted_tokens += len(tokens) - 1
                seq.draft_token_ids = []
                for kept in tokens[:-1]:  # kept drafts: their keys/values are in the cache
                    seq.num_computed_tokens += 1
                    self._append(seq, kept)
                    if seq.is_finished:
                        break
                else:
                    self._append(seq, tokens[-1])
                    if len(tokens) > 1 and not seq.is_finished:  # kept drafts may fill a block
                        self.blocks.register_full_blocks(seq)
                if seq.rope_switch is not None and not seq.is_finished \
                        and seq.num_tokens > seq.rope_switch:
                    self._compute_again_past_switch(seq)
                touched[seq.request_id] = self.requests[seq.request_id]
        for request_id, request in list(self.requests.items()):
            if request.finished:
                touched[request_id] = request
        outputs = [self._output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def _set_rope_length(self, seq: Sequence, length: int) -> None:
        """The length ``seq``'s RoPE table counts from (``Sequence.rope_length``), what tells
        that table apart in the prefix cache, and whether Phi-3's switch is still ahead."""
        config = self.model.config
        seq.rope_length = length
        seq.rope_key = table_key(config.rope_scaling, config.max_position_embeddings, length)
        seq.rope_switch = (self.rope_switch if self.rope_switch is not None
                           and length <= self.rope_switch else None)

    def _compute_again_past_switch(self, seq: Sequence) -> None:
        """Phi-3's LongRoPE: ``seq`` now passes ``original_max_position_embeddings``, so its
        keys and values are dropped and every token is computed again, under the long factors
        (HF's Phi-3 generation drops its cache there). Its blocks stay in the prefix cache
        under the short factors' key; it stays running, and its next step is a prefill."""
        self.blocks.free_sequence(seq)
        self._set_rope_length(seq, seq.num_tokens)

    def _append(self, seq: Sequence, sampled: SampledToken, jump_forward: bool = True) -> None:
        token, params = sampled.token_id, seq.params
        seq.append_token(token, sampled.logprob, sampled.top_logprobs)
        self.generation_tokens += 1
        request = self.requests[seq.request_id]
        decoder = request.decoders[seq.index]
        before = len(seq.text)
        if decoder is not None:
            seq.text += decoder.push(token)
        if seq.guide is not None:
            seq.guide.consume_token(token)  # masked to what the grammar allows: never refused
        if token in params.stop_token_ids:
            seq.stop_reason = token
            return self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if token in self.eos_token_ids and not params.ignore_eos:
            return self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        for stop in params.stop_strings:
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                seq.text = seq.text[:at + (len(stop) if params.include_stop_str_in_output else 0)]
                seq.stop_reason = stop
                return self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if seq.guide is not None and seq.guide.is_stopped():  # complete: only EOS could follow
            return self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        if (params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            return self.scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
        if jump_forward and seq.guide is not None and self.config.jump_forward \
                and params.logprobs is None:  # a forced token has no distribution to report
            # jump-forward: tokens the grammar forces (a JSON key, its quote and colon) are
            # appended without a draw; the next step computes them with the rest, as a chunk
            for forced in seq.guide.compute_ff_tokens():
                self.num_forced_tokens += 1
                self._append(seq, SampledToken(forced), jump_forward=False)
                if seq.is_finished:
                    break

    def _output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(seq.index, seq.text, list(seq.output_token_ids),
                             seq.cumulative_logprob if request.params.logprobs is not None else None,
                             list(seq.logprobs) if request.params.logprobs is not None else None,
                             seq.finish_reason, seq.stop_reason)
            for seq in request.sequences]
        first = request.sequences[0]
        finished_times = [s.finished_time for s in request.sequences if s.finished_time]
        first_tokens = [s.first_token_time for s in request.sequences if s.first_token_time]
        metrics = RequestMetrics(first.arrival_time, min(first_tokens, default=None),
                                 max(finished_times) if request.finished else None,
                                 first.num_cached_tokens)
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             completions, request.finished, metrics,
                             list(first.prompt_logprobs) if first.prompt_logprobs is not None
                             else None)

    def check_workers(self) -> None:
        """Raise ``WorkerDied`` if a tensor-parallel worker exited (nothing to check otherwise);
        the async front calls it between steps, so it notices while idle too."""
        if self.parallel is not None:
            self.parallel.check_alive()

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit); the engine
        cannot run afterwards. Nothing to do for a one-process engine."""
        if self.parallel is not None:
            self.parallel.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_blocks=self.blocks.num_blocks, num_free_blocks=self.blocks.num_free_blocks,
            prefix_cache_hit_rate=self.blocks.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens, num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens)


def _record_prompt_logprobs(prompt_logits) -> None:
    """Write each scored prompt position's log-probabilities (the raw distribution's, as
    ``logprobs``) into its sequence: the token's own, then the ``prompt_logprobs`` most likely."""
    logprobs = torch.log_softmax(prompt_logits.logits.float(), dim=-1)
    row = 0
    for seq, first, count in prompt_logits.spans:
        rows = logprobs[row:row + count]
        targets = seq.prompt_token_ids[first + 1:first + 1 + count]
        chosen = rows.gather(1, torch.tensor(targets, device=rows.device)[:, None])[:, 0].tolist()
        k = seq.params.prompt_logprobs
        top = rows.topk(k) if k else None
        for j, (token, value) in enumerate(zip(targets, chosen, strict=True)):
            entry = {token: value}
            if top is not None:
                entry.update(zip(top.indices[j].tolist(), top.values[j].tolist(), strict=True))
            seq.prompt_logprobs[first + 1 + j] = entry
        row += count


def _context_length(config) -> int:
    """The longest sequence a model takes by default: ``max_position_embeddings``; with dynamic
    NTK RoPE, which grows its base past that (the original window), times its ``factor``."""
    if config.position_kind == "rope" and rope_type(config.rope_scaling) == "dynamic":
        return int(config.max_position_embeddings * config.rope_scaling["factor"])
    return config.max_position_embeddings


def default_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]
