"""An OpenAI-compatible HTTP server over an ``LLMEngine``: ``build_app(engine, name)``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming with SSE),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus), and the playground page at
``GET /``. Every error is OpenAI's
error object with the matching status; a client that disconnects aborts its requests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from operator import methodcaller

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mlx_serve.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from mlx_serve.data_parallel import DataParallelEngine
from mlx_serve.engine import LLMEngine
from mlx_serve.metrics import CONTENT_TYPE, ServerMetrics
from mlx_serve.outputs import CompletionOutput, RequestOutput
from mlx_serve.playground import add_playground
from mlx_serve.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorResponse,
    FunctionCall,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    ToolCallModel,
    TopLogprob,
    UnloadLoraAdapterRequest,
    Usage,
    error_body,
)
from mlx_serve.sampling_params import SamplingParams
from mlx_serve.structured import GuidedDecodingParams
from mlx_serve.tools import (
    ToolCall,
    allowed_tools,
    call_constraint,
    check_parser,
    held_back,
    parse_tool_calls,
    prompt_messages,
    template_reads_tools,
)

logger = logging.getLogger("mlx_serve")


def build_app(engine: LLMEngine | DataParallelEngine, served_model_name: str,
              api_key: str | None = None, *,
              max_waiting_seqs: int | None = None, allow_runtime_lora: bool = False,
              tool_call_parser: str = "hermes", ui: bool = True) -> FastAPI:
    """A FastAPI app serving ``engine`` as model ``served_model_name``. The engine thread starts
    and stops with the app's lifespan. ``api_key``: clients must send ``Authorization: Bearer
    KEY`` to ``/v1/*``. ``max_waiting_seqs``: beyond this many waiting sequences new requests get
    503 with ``Retry-After``. LoRA adapters loaded in the engine are served under their names;
    ``allow_runtime_lora`` adds ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
    (vLLM's routes; they read adapter directories on the server, so they are off by default).
    ``tool_call_parser`` (``hermes``, ``llama3_json``): how chat outputs' tool calls are written
    (``mlx_serve.tools``). ``ui``: the playground page at ``/`` (``mlx_serve.playground``).
    ``engine`` may be a ``DataParallelEngine`` (replicas in processes of their own, already an
    async front like ``AsyncEngine``; ``max_waiting_seqs`` is then each replica's)."""
    if isinstance(engine, DataParallelEngine):
        async_engine = engine
        if max_waiting_seqs is not None:
            async_engine.max_waiting_seqs = max_waiting_seqs
    else:
        async_engine = AsyncEngine(engine, max_waiting_seqs=max_waiting_seqs)
    engine = async_engine.engine  # what the routes read: the engine, or the replicas' facts
    metrics = ServerMetrics()
    metrics.attach(async_engine)
    handler = _Handler(async_engine, served_model_name, check_parser(tool_call_parser))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="mlx-serve", version="0.1.0", lifespan=lifespan,
                  summary="OpenAI-compatible completions and chat completions")
    app.state.engine = async_engine
    app.state.metrics = metrics
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_APIKeyCheck, api_key=api_key)

    errors = {status: {"model": ErrorResponse, "description": text} for status, text in (
        (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (500, "Internal error"), (503, "Overloaded (Retry-After) or engine stopped"))}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=errors)
    async def create_completion(body: CompletionRequest, raw: Request):
        return await handler.completion(body, raw)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=errors)
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return await handler.chat(body, raw)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors)
    async def create_embeddings(body: EmbeddingRequest, raw: Request):
        return await handler.embeddings(body, raw)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=errors)
    async def tokenize(body: TokenizeRequest):
        return handler.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=errors)
    async def detokenize(body: DetokenizeRequest):
        return handler.detokenize(body)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        cards = [ModelCard(id=served_model_name, root=served_model_name,
                           max_model_len=engine.max_model_len)]
        for lora in list(engine.loras.adapters.values()):
            cards.append(ModelCard(id=lora.name, root=lora.path, parent=served_model_name,
                                   max_model_len=engine.max_model_len))
        return ModelList(data=cards)

    if allow_runtime_lora:
        @app.post("/v1/load_lora_adapter", responses=errors)
        async def load_lora_adapter(body: LoadLoraAdapterRequest):
            if body.lora_name == served_model_name:
                raise OpenAIError(400, f"'{body.lora_name}' is the base model's name; give the "
                                  "adapter another", param="lora_name")
            try:
                await async_engine.call(methodcaller("add_lora", body.lora_name,
                                                     body.lora_path))
            except (ValueError, FileNotFoundError) as error:
                raise OpenAIError(400, str(error), param="lora_path") from None
            return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", responses=errors)
        async def unload_lora_adapter(body: UnloadLoraAdapterRequest):
            try:
                await async_engine.call(methodcaller("remove_lora", body.lora_name))
            except KeyError as error:
                raise OpenAIError(404, error.args[0], param="lora_name",
                                  code="model_not_found") from None
            except ValueError as error:
                raise OpenAIError(400, str(error), param="lora_name") from None
            return PlainTextResponse(
                f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        if not async_engine.healthy:
            return JSONResponse(error_body("the engine is not running", "server_error"), 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if ui:
        add_playground(app)
    return app


# -- errors and authentication ---------------------------------------------------------------
def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, e: OpenAIError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        problems, param = [], None
        for error in e.errors():
            loc = [str(p) for p in error.get("loc", ()) if p != "body"]
            param = param or (".".join(loc) or None)
            problems.append(f"{'.'.join(loc) or 'body'}: {error.get('msg')}")
        return _error_response(OpenAIError(400, "invalid request: " + "; ".join(problems),
                                           param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(OpenAIError(e.status_code, str(e.detail), kind,
                                           headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error_response(OpenAIError(500, "internal server error; the server log has the "
                                           "details", "server_error"))


class _APIKeyCheck:
    """ASGI middleware: ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error_response(OpenAIError(
                    401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key"))
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class _Disconnected(Exception):
    pass


async def _wait_for_disconnect(raw: Request) -> None:
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(raw: Request, awaitable):
    """Await ``awaitable``; if the client goes away first, cancel it (which aborts its
    requests) and raise ``_Disconnected``."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise _Disconnected
    return task.result()


class _SSE(StreamingResponse):
    """Server-sent events whose generator is closed (aborting its requests) however the
    response ends, a client disconnect included."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(RuntimeError):  # already closed, or closing
                await self.body_iterator.aclose()


def _encoded(vector, encoding_format: str) -> list[float] | str:
    """An embedding as JSON floats, or base64 of its float32 little-endian bytes (OpenAI's)."""
    if encoding_format == "base64":
        return base64.b64encode(vector.float().cpu().numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def _sse(payload) -> str:
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {text}\n\n"


# -- the two endpoints -----------------------------------------------------------------------
class _Handler:
    def __init__(self, async_engine: AsyncEngine | DataParallelEngine, served_model_name: str,
                 tool_call_parser: str):
        self.async_engine = async_engine
        self.tool_call_parser = tool_call_parser
        self.engine = async_engine.engine
        self.tokenizer = self.engine.tokenizer
        self.model_name = served_model_name

    # shared steps
    def _adapter_for(self, model: str) -> str | None:
        """The LoRA adapter a request's ``model`` names (None: the base model)."""
        if model == self.model_name:
            return None
        adapters = self.engine.list_loras()
        if model in adapters:
            return model
        served = ", ".join(repr(m) for m in [self.model_name, *adapters])
        raise OpenAIError(404, f"the model '{model}' does not exist; this server serves {served} "
                          "(see /v1/models)", param="model", code="model_not_found")

    def _max_tokens(self, prompts: list[list[int]], requested: int | None, param: str) -> int:
        limit = self.engine.max_model_len
        longest = max(len(p) for p in prompts)
        if requested is not None:
            if longest + requested > limit:
                raise OpenAIError(400, f"this model's maximum context length is {limit} tokens; "
                                  f"you asked for {longest + requested} ({longest} in the prompt, "
                                  f"{requested} to generate): shorten the prompt or lower "
                                  "max_tokens", param="max_tokens")
            return requested
        capacity = min(limit, self.engine.blocks.num_blocks * self.engine.blocks.block_size)
        if capacity - longest < 1:
            raise OpenAIError(400, f"the prompt has {longest} tokens; this model takes at most "
                              f"{capacity} (prompt + output): shorten it", param=param)
        return capacity - longest

    def _priority(self, body) -> int:
        if body.priority and self.engine.scheduler.config.policy != "priority":
            raise OpenAIError(400, "priority is used only when the server schedules by priority: "
                              "start it with --scheduling-policy priority, or leave priority out",
                              param="priority")
        return body.priority

    async def _start(self, raw: Request, prefix: str, prompts: list[list[int]],
                     params: SamplingParams, lora_name: str | None, priority: int):
        """Submit the prompts; return the output stream and its first output (so that errors
        become an error response, not a broken stream)."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        stream = self.async_engine.generate(
            [(f"{request_id}-{i}", p) for i, p in enumerate(prompts)], params, lora_name, priority)
        try:
            first = await _unless_disconnected(raw, anext(stream))
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None
        except EngineOverloaded as e:
            raise OpenAIError(503, f"the server is overloaded ({e}); retry shortly",
                              "server_error", code="overloaded",
                              headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise OpenAIError(503, str(e), "server_error") from None
        return request_id, stream, first

    async def _collect(self, raw: Request, stream, first: RequestOutput) -> list[RequestOutput]:
        """Every request's final output, in prompt order."""
        final = {first.request_id: first}

        async def drain():
            async for out in stream:
                final[out.request_id] = out

        try:
            await _unless_disconnected(raw, drain())
        except EngineDead as e:
            raise OpenAIError(503, str(e), "server_error") from None
        return [final[k] for k in sorted(final, key=lambda k: int(k.rsplit("-", 1)[1]))]

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    # /tokenize, /detokenize (vLLM's)
    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        if body.model is not None:
            self._adapter_for(body.model)  # 404 for a model this server does not serve
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give a prompt or messages (one of them)", param="prompt")
        if body.messages is not None:
            try:
                tokens = self.tokenizer.apply_chat_template(
                    [m.as_template_message() for m in body.messages],
                    add_generation_prompt=body.add_generation_prompt)
            except Exception as e:
                raise OpenAIError(400, f"cannot apply the chat template: {e}",
                                  param="messages") from None
        else:
            tokens = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens),
                                max_model_len=self.engine.max_model_len)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if body.model is not None:
            self._adapter_for(body.model)
        vocab = self.engine.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise OpenAIError(400, f"token ids must be in [0, {vocab}) for this model",
                              param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    # /v1/embeddings
    async def embeddings(self, body: EmbeddingRequest, raw: Request):
        if self._adapter_for(body.model) is not None:
            raise OpenAIError(400, f"embeddings come from the base model; LoRA adapters apply to "
                              f"generation only: send model='{self.model_name}'", param="model")
        hidden = self.engine.model.config.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise OpenAIError(400, f"this model's embeddings have {hidden} dimensions; shortened "
                              f"embeddings (dimensions={body.dimensions}) are not supported",
                              param="dimensions")
        inputs = body.inputs()
        try:
            vectors, token_lists = await _unless_disconnected(
                raw, self.async_engine.call_one(methodcaller("embed", inputs)))
        except ValueError as e:
            raise OpenAIError(400, str(e), param="input") from None
        except EngineDead as e:
            raise OpenAIError(503, str(e), "server_error") from None
        data = [Embedding(index=i, embedding=_encoded(v, body.encoding_format))
                for i, v in enumerate(vectors)]
        tokens = sum(len(ids) for ids in token_lists)
        return EmbeddingResponse(data=data, model=body.model,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    # /v1/completions
    async def completion(self, body: CompletionRequest, raw: Request):
        lora_name = self._adapter_for(body.model)
        body.check_supported()
        prompts = [self.tokenizer.encode(p) if isinstance(p, str) else list(p)
                   for p in body.prompts()]
        max_tokens = self._max_tokens(prompts, body.max_tokens, "prompt")
        params = body.sampling_params(max_tokens, body.logprobs)
        ranking = body.candidates > body.n
        if ranking:  # best_of: more candidates, ranked by their cumulative log-probability
            params.n, params.logprobs = body.candidates, params.logprobs or 0
        if body.echo and body.logprobs is not None:  # the echoed prompt's tokens get theirs too
            params.prompt_logprobs = body.logprobs
        echoed = [self.tokenizer.decode(p, skip_special_tokens=False) if body.echo else ""
                  for p in prompts]
        try:
            request_id, stream, first = await self._start(raw, "cmpl", prompts, params, lora_name,
                                                          self._priority(body))
        except _Disconnected:
            return Response(status_code=499)
        if body.stream:
            return _SSE(self._completion_events(body, request_id, stream, first, params, echoed))
        try:
            finals = await self._collect(raw, stream, first)
        except _Disconnected:
            return Response(status_code=499)
        choices = []
        for i, out in enumerate(finals):
            kept = out.outputs
            if ranking:
                kept = sorted(kept, key=lambda c: c.cumulative_logprob, reverse=True)[:body.n]
            for rank, c in enumerate(kept):
                choices.append(CompletionChoice(
                    index=i * body.n + (rank if ranking else c.index), text=echoed[i] + c.text,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    logprobs=self._echoed_logprobs(out, body.logprobs, self._completion_logprobs(
                        c, 0, len(echoed[i]), body.logprobs))))
        return CompletionResponse(id=request_id, model=body.model, choices=choices,
                                  usage=_usage(finals))

    def _completion_logprobs(self, c: CompletionOutput, start: int, offset: int,
                             k: int | None) -> CompletionLogprobs | None:
        if k is None or c.logprobs is None:
            return None
        return self._token_logprobs(c.token_ids[start:], c.logprobs[start:], offset, k)

    def _token_logprobs(self, token_ids, entries, offset: int, k: int) -> CompletionLogprobs:
        """OpenAI's completion logprobs of ``token_ids``, each with its ``{id: logprob}`` entry
        (None: a token with no log-probability, the prompt's first), text offsets from
        ``offset``."""
        out = CompletionLogprobs()
        for token_id, entry in zip(token_ids, entries, strict=False):
            piece = self._piece(token_id)
            out.tokens.append(piece)
            out.token_logprobs.append(None if entry is None else entry.get(token_id))
            top = {}  # pieces may coincide (two byte tokens print as U+FFFD): the likelier stays
            for t, v in ([] if entry is None else sorted(entry.items(), key=lambda kv: -kv[1])[:k]):
                top.setdefault(self._piece(t), v)
            out.top_logprobs.append(top if k and entry else None)
            out.text_offset.append(offset)
            offset += len(piece)
        return out

    def _echoed_logprobs(self, out: RequestOutput, k: int | None,
                         completion: CompletionLogprobs | None) -> CompletionLogprobs | None:
        """With ``echo`` and ``logprobs``: the prompt's tokens (the first has no log-probability,
        as OpenAI's) before the completion's."""
        if k is None or out.prompt_logprobs is None:
            return completion
        merged = self._token_logprobs(out.prompt_token_ids, out.prompt_logprobs, 0, k)
        if completion is not None:
            for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(merged, field).extend(getattr(completion, field))
        return merged

    async def _completion_events(self, body: CompletionRequest, request_id: str, stream,
                                 first: RequestOutput, params: SamplingParams, echoed: list[str]):
        deltas = _Deltas(params)
        finals: dict[str, RequestOutput] = {}
        try:
            out = first
            while True:
                prompt_index = int(out.request_id.rsplit("-", 1)[1])
                choices = []
                for c in out.outputs:
                    key = (prompt_index, c.index)
                    text, start = deltas.take(key, c)
                    if text is None:
                        continue
                    first_chunk = key not in deltas.offsets
                    if first_chunk:  # a choice's first chunk: the echoed prompt first
                        text = echoed[prompt_index] + text
                    offset = deltas.offsets.get(key, len(echoed[prompt_index]))
                    deltas.offsets[key] = offset + len(text) - (
                        len(echoed[prompt_index]) if first_chunk else 0)
                    logprobs = self._completion_logprobs(c, start, offset, body.logprobs)
                    if first_chunk:
                        logprobs = self._echoed_logprobs(out, body.logprobs, logprobs)
                    choices.append(CompletionChoice(
                        index=prompt_index * params.n + c.index, text=text,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        logprobs=logprobs))
                if choices:
                    yield _sse(CompletionResponse(id=request_id, model=body.model,
                                                  choices=choices))
                if out.finished:
                    finals[out.request_id] = out
                out = await anext(stream, None)
                if out is None:
                    break
            if body.include_usage:
                yield _sse(CompletionResponse(id=request_id, model=body.model, choices=[],
                                              usage=_usage(list(finals.values()))))
            yield "data: [DONE]\n\n"
        except EngineDead as e:
            yield _sse(error_body(str(e), "server_error"))
        finally:
            await stream.aclose()

    # /v1/chat/completions
    async def chat(self, body: ChatCompletionRequest, raw: Request):
        lora_name = self._adapter_for(body.model)
        body.check_supported()
        tools = body.tool_dicts()
        messages, template_tools = prompt_messages(
            [m.as_template_message() for m in body.messages], tools,
            template_reads_tools(self.tokenizer))
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=body.add_generation_prompt, tools=template_tools)
        except Exception as e:  # no template, or the template refuses these messages
            raise OpenAIError(400, f"cannot apply the chat template: {e}",
                              param="messages") from None
        max_tokens = self._max_tokens([prompt], body.requested_max_tokens, "messages")
        params = body.sampling_params(max_tokens, body.num_logprobs)
        parser = self.tool_call_parser if tools else None
        if tools and body.tool_choice_value != "auto":  # required, or one named function
            if params.guided_decoding is not None:
                raise OpenAIError(400, "a required tool call and response_format (or guided_*) "
                                  "both constrain the output: give one", param="tool_choice")
            try:
                allowed = allowed_tools(tools, body.tool_choice_value)
            except ValueError as e:
                raise OpenAIError(400, str(e), param="tool_choice") from None
            params.guided_decoding = GuidedDecodingParams(
                **call_constraint(allowed, parser, body.parallel_tool_calls))
        try:
            request_id, stream, first = await self._start(raw, "chatcmpl", [prompt], params,
                                                          lora_name, self._priority(body))
        except _Disconnected:
            return Response(status_code=499)
        if body.stream:
            return _SSE(self._chat_events(body, request_id, stream, first, params, parser))
        try:
            final = (await self._collect(raw, stream, first))[0]
        except _Disconnected:
            return Response(status_code=499)
        choices = []
        for c in final.outputs:
            content, calls = parse_tool_calls(c.text, parser) if parser else (c.text, [])
            choices.append(ChatChoice(
                index=c.index, message=ChatResponseMessage(
                    content=content, tool_calls=[_tool_call(t) for t in calls] or None),
                finish_reason="tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason,
                stop_reason=c.stop_reason, logprobs=self._chat_logprobs(c, 0, body.num_logprobs)))
        return ChatCompletionResponse(id=request_id, model=body.model, choices=choices,
                                      usage=_usage([final]))

    def _chat_logprobs(self, c: CompletionOutput, start: int, k: int | None) -> ChatLogprobs | None:
        if k is None or c.logprobs is None:
            return None
        content = []
        for token_id, entry in zip(c.token_ids[start:], c.logprobs[start:], strict=False):
            piece = self._piece(token_id)
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(TokenLogprob(
                token=piece, logprob=entry.get(token_id), bytes=list(piece.encode()),
                top_logprobs=[TopLogprob(token=(p := self._piece(t)), logprob=v,
                                         bytes=list(p.encode())) for t, v in top]))
        return ChatLogprobs(content=content)

    async def _chat_events(self, body: ChatCompletionRequest, request_id: str, stream,
                           first: RequestOutput, params: SamplingParams, parser: str | None):
        deltas = _Deltas(params, parser)

        def chunk(choices, usage=None):
            return _sse(ChatCompletionChunk(id=request_id, model=body.model,
                                            choices=choices, usage=usage))

        try:
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                        content=""))
                         for i in range(params.n)])
            out = first
            while True:
                choices = []
                for c in out.outputs:
                    text, start = deltas.take(c.index, c)
                    if text is None:
                        continue
                    calls = parse_tool_calls(c.text, parser)[1] if parser and c.finished else []
                    if calls:  # the held-back text was the calls: they go as tool_calls deltas
                        choices.append(ChatStreamChoice(
                            index=c.index, delta=DeltaMessage(tool_calls=[
                                DeltaToolCall(index=i, id=t.id, type="function",
                                              function=DeltaFunctionCall(name=t.name,
                                                                         arguments=t.arguments))
                                for i, t in enumerate(calls)]),
                            finish_reason="tool_calls" if c.finish_reason == "stop"
                            else c.finish_reason, stop_reason=c.stop_reason))
                        continue
                    choices.append(ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=text or None),
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                        logprobs=self._chat_logprobs(c, start, body.num_logprobs)))
                if choices:
                    yield chunk(choices)
                if out.finished:
                    break
                out = await anext(stream)
            if body.include_usage:
                yield chunk([], _usage([out]))
            yield "data: [DONE]\n\n"
        except EngineDead as e:
            yield _sse(error_body(str(e), "server_error"))
        finally:
            await stream.aclose()


class _Deltas:
    """What each choice has streamed so far. While a choice runs, the last ``len(stop) - 1``
    characters are held back: a stop string completed by a later token cuts the text there, and
    what was sent must stay a prefix of the final text."""

    def __init__(self, params: SamplingParams, tool_parser: str | None = None):
        self.hold = max((len(s) for s in params.stop_strings), default=1) - 1
        self.tool_parser = tool_parser  # text that may be a tool call waits for the end
        self.wants_tokens = params.logprobs is not None
        self.text: dict = {}
        self.tokens: dict = {}
        self.done: set = set()
        self.offsets: dict = {}

    def take(self, key, c: CompletionOutput) -> tuple[str | None, int]:
        """The new text of choice ``key`` (None: nothing to send) and the index of its first
        token not sent yet."""
        if key in self.done:
            return None, 0
        sent, start = self.text.get(key, 0), self.tokens.get(key, 0)
        end = len(c.text) if c.finished else max(sent, len(c.text) - self.hold)
        if self.tool_parser and not c.finished:
            end = max(sent, min(end, len(c.text) - held_back(c.text, self.tool_parser)))
        text = c.text[sent:end]
        new_tokens = len(c.token_ids) > start
        if not text and not c.finished and not (new_tokens and self.wants_tokens):
            return None, start
        self.text[key], self.tokens[key] = end, len(c.token_ids)
        if c.finished:
            self.done.add(key)
        return text, start


def _tool_call(call: ToolCall) -> ToolCallModel:
    return ToolCallModel(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _usage(finals: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    cached = sum(o.metrics.num_cached_tokens for o in finals if o.metrics is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", dead_engine_grace_s: float = 2.0) -> None:
    """Serve ``app`` with uvicorn until Ctrl-C (or SIGTERM), which aborts the requests in flight
    (their streams end with finish reason "abort") so that the server stops at once, cleanly.
    An engine that stops on its own (its thread failed; a data-parallel replica died) is
    answered with 503 for ``dead_engine_grace_s`` seconds, then the server stops and this raises
    ``EngineDead`` (``mlx serve`` exits non-zero) rather than serve nothing forever."""
    import uvicorn

    engine = app.state.engine

    class Server(uvicorn.Server):
        dead_since: float | None = None

        def handle_exit(self, sig, frame):
            engine.abort_all()
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if not engine.healthy and not self.should_exit:
                self.dead_since = self.dead_since or time.monotonic()
                if time.monotonic() - self.dead_since >= dead_engine_grace_s:
                    logger.error("the engine stopped; stopping the server")
                    engine.abort_all()  # what still streams from live replicas ends now
                    return True
            return await super().on_tick(counter)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=10))
    server.run()
    if server.dead_since is not None:
        raise EngineDead(f"the engine stopped while serving: "
                         f"{getattr(engine, 'error', None) or 'see the log above'}")
