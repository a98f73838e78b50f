"""ttserve: an OpenAI-compatible HTTP server with continuous batching over a compiled
program.

    scheduler.py   continuous batching: decode slots, the KV page pool, the engine thread
    textstream.py  generated text with stop strings
    protocol.py    request bodies -> validated parameters, or OpenAI's error object
    responses.py   OpenAI response bodies and SSE chunks
    metrics.py     Prometheus metrics
    eventstream.py an SSE response that notices a client leaving
    app.py         the FastAPI endpoints
    server.py      uvicorn + the engine thread, in the foreground or a thread
    cli.py         the `ttserve` command

The device calls themselves are runtime/engine.py's, shared with the vLLM model interface
(runtime/vllm_model.py). Importing this package imports neither FastAPI nor torch.
"""
