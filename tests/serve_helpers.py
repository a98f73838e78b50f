"""Helpers for the serving tests (ttserve and the vLLM interface): a tiny random Llama
that speaks SmolLM2's tokenizer (fast to run, real text in and out), a live server in a
thread on a free port, and reading /metrics."""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")

# The tiny served program: 4 decode slots, a 256-token context, a pool of 20 blocks of 32
# (two full-context users: a third waits for pages), prompts over 128 tokens in chunks.
TINY_PROGRAM = dict(optimizations="accuracy", batch_size=4, max_seq_len=256, max_num_blocks=20,
                    max_prefill_chunk=128)
# SmolLM2 served: 32 decode slots, a 512-token context, a pool of 512 blocks of 32 (32
# full-context users), prompts over 128 tokens prefilled in chunks of 128.
SMOLLM2_PROGRAM = dict(optimizations="accuracy", batch_size=32, max_seq_len=512, max_num_blocks=512,
                       max_prefill_chunk=128)


def tiny_chat_model(tiny_model, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template."""
    path = tiny_model("serve-llama", vocab_size=49152, max_position_embeddings=1024)
    for name in TOKENIZER_FILES:
        if not (path / name).exists():
            shutil.copy2(smollm2_dir / name, path / name)
    return path


@contextmanager
def live_server(program_or_session, max_waiting: int = 128):
    """A ttserve Server on 127.0.0.1 and a free port, serving from a thread."""
    import runtime
    from runtime.serve.server import Server

    session = runtime.load(program_or_session) if isinstance(program_or_session, (str, Path)) \
        else program_or_session
    server = Server(session, host="127.0.0.1", port=0, max_waiting=max_waiting).start()
    try:
        yield server
    finally:
        server.stop()


def openai_client(server, **options):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, **options)


def metrics(server) -> dict[str, float]:
    """GET /metrics as {sample name with labels: value}."""
    import httpx

    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
