"""The HTTP side of ttserve: OpenAI's endpoints over a Scheduler (FastAPI).

    GET  /health                 200 while the engine thread runs, else 503
    GET  /v1/models              the one model this server runs
    POST /v1/completions         text (or token ids) in, text out; stream: true for SSE
    POST /v1/chat/completions    messages through the artifact's chat template
    GET  /metrics                Prometheus text (runtime/serve/metrics.py)

Handlers never touch the device: they validate (runtime/serve/protocol.py), tokenize,
`submit` to the scheduler and wait on an asyncio queue its engine thread feeds. Every
error is OpenAI's error object; a bad request is answered 400 naming the field, an
over-full queue 429, and neither reaches the engine. A client that disconnects (streaming
or not) has its request cancelled, which frees its slot and pages.
"""
from __future__ import annotations

import asyncio
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..engine import Sampler
from . import responses
from .eventstream import EventStream
from .protocol import APIError, Generation, parse_chat, parse_completion, parse_json
from .scheduler import NeverFits, QueueFull
from .scheduler import Request as Job
from .textstream import TextStream

log = logging.getLogger("ttserve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is there


def create_app(scheduler, tokenizer, model_id: str, metrics) -> FastAPI:
    app = FastAPI(title="ttserve", docs_url=None, redoc_url=None, openapi_url=None)
    context = scheduler.engine.max_seq_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        if error.status in (400, 429):
            metrics.rejected.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return JSONResponse(APIError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        log.exception("unhandled error")
        body = APIError(500, f"internal server error: {error}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        if not scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "ttcompile", "max_model_len": context}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = parse_completion(parse_json(await request.body()), model_id, tokenizer.vocab_size)
        prompt = params.prompt if isinstance(params.prompt, list) else tokenizer.encode(params.prompt)
        return await _generate(request, params, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        params = parse_chat(parse_json(await request.body()), model_id)
        try:
            prompt = tokenizer.encode_chat(params.messages)
        except Exception as e:  # the template refused the conversation (raise_exception)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None
        return await _generate(request, params, prompt, chat=True)

    async def _generate(request: Request, params: Generation, prompt: list[int], chat: bool):
        max_tokens = params.max_tokens
        if max_tokens is None:  # chat: the rest of the context; completions: OpenAI's 16
            left = context - len(prompt)
            max_tokens = left if chat else min(COMPLETION_DEFAULT_MAX_TOKENS, max(left, 1))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(prompt=prompt, max_tokens=max_tokens, sampler=Sampler(params.temperature, params.top_p, params.seed),
                  sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                  text=TextStream(tokenizer, params.stop), id=responses.new_id(chat))
        try:
            scheduler.submit(job)
        except NeverFits as e:
            raise APIError(400, str(e), e.param) from None
        except QueueFull as e:
            raise APIError(429, str(e), None, "rate_limit_exceeded", "rate_limit_error") from None
        if params.stream:
            return EventStream(_stream(job, events, params, chat), headers={"Cache-Control": "no-cache"})
        return await _collect(request, job, events, chat)

    async def _collect(request: Request, job: Job, events: asyncio.Queue, chat: bool):
        parts = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nobody reads it; the finally cancels
                    continue
                if event.kind == "token":
                    parts.append(event.text)
                elif event.kind == "error":
                    raise APIError(500, event.message, kind="server_error")
                else:
                    usage = responses.usage(len(job.prompt), len(job.generated))
                    build = responses.chat_completion if chat else responses.completion
                    return build(job.id, model_id, "".join(parts), event.finish_reason, usage)
        finally:
            scheduler.cancel(job.id)  # a no-op when it has finished

    async def _stream(job: Job, events: asyncio.Queue, params: Generation, chat: bool):
        def chunk(text: str, finish_reason=None) -> str:
            if chat:
                return responses.sse(responses.chat_chunk(job.id, model_id, {"content": text} if text or
                                                          finish_reason is None else {}, finish_reason))
            return responses.sse(responses.completion_chunk(job.id, model_id, text, finish_reason))

        try:
            if chat:
                yield responses.sse(responses.chat_chunk(job.id, model_id, {"role": "assistant", "content": ""}))
            while True:
                event = await events.get()
                if event.kind == "token":
                    if event.text:
                        yield chunk(event.text)
                elif event.kind == "error":
                    yield responses.sse(APIError(500, event.message, kind="server_error").body())
                    break
                else:
                    yield chunk("", event.finish_reason)
                    if params.include_usage:
                        usage = responses.usage(len(job.prompt), len(job.generated))
                        yield responses.sse(responses.usage_chunk(job.id, model_id, chat, usage))
                    break
            yield responses.sse("[DONE]")
        finally:
            scheduler.cancel(job.id)  # the client went away mid-stream, or a no-op

    return app
