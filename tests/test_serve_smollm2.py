"""ttserve on the real SmolLM2-135M-Instruct program (32 decode slots, a 512-token context,
a pool of 512 blocks of 32 = 32 full-context users, prompts over 128 tokens prefilled in
chunks of 128), through the real `openai` client: the chat answer names Paris; greedy
output does not change when a request joins mid-flight among 31 others; a request
arriving while others decode starts before they finish; after 50 requests, some
cancelled mid-stream, every KV block is back and the server still answers correctly."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_helpers import SMOLLM2_PROGRAM, live_server, metrics, openai_client

pytestmark = pytest.mark.slow  # the real 135M model, 32 users a step on the emulator

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WORDS = "the a river of light under seven old bridges sang quietly while children ran home".split()


@pytest.fixture(scope="module")
def server(smollm2_dir, compile_artifact):
    with live_server(compile_artifact(smollm2_dir, **SMOLLM2_PROGRAM)) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=600)


@pytest.fixture(scope="module")
def paris(server, client):
    """The greedy chat answer, alone on the server."""
    answer = client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=12, temperature=0)
    return answer.choices[0].message.content


def text_of(n_words: int, seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n_words))


def idle(server) -> bool:
    m = metrics(server)
    return m["ttserve_kv_blocks_used"] == 0 and m["ttserve_requests_running"] == 0 and \
        m["ttserve_requests_waiting"] == 0


def wait_idle(server, timeout=600):
    deadline = time.monotonic() + timeout
    while not idle(server):
        assert time.monotonic() < deadline
        time.sleep(0.1)


class Streamer:
    """A streaming completion in a thread, with the time of its first and last chunk."""

    def __init__(self, client, model, prompt, max_tokens, close_after=None):
        self.text, self.first_at, self.done_at, self.finish_reason = "", None, None, None
        self.thread = threading.Thread(target=self._run, args=(client, model, prompt, max_tokens, close_after))
        self.thread.start()

    def _run(self, client, model, prompt, max_tokens, close_after):
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True)
        for i, chunk in enumerate(stream):
            self.first_at = self.first_at or time.monotonic()
            self.text += chunk.choices[0].text
            self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
            if close_after is not None and i + 1 >= close_after:
                stream.close()  # the client goes away mid-stream
                break
        self.done_at = time.monotonic()

    def join(self):
        self.thread.join(600)
        return self


def test_chat_names_paris(server, client, paris):
    assert "Paris" in paris
    streamed = client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=12,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == paris


def test_joining_mid_flight_among_31_others_changes_nothing(server, client):
    """A request alone, then the same request joining 31 others of different prompt
    lengths (some prefilled in several chunks) that are already decoding."""
    prompt = text_of(40, seed=99)
    alone = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=10, temperature=0)
    longest = text_of(260, seed=0)  # 3 prefill chunks of 128
    longest_alone = client.completions.create(model=server.model_id, prompt=longest, max_tokens=16, temperature=0)
    lengths = [260] + list(np.random.default_rng(1).integers(3, 200, size=30))
    others = [Streamer(client, server.model_id, longest if i == 0 else text_of(int(n), seed=i), 16)
              for i, n in enumerate(lengths)]
    deadline = time.monotonic() + 600
    while sum(s.first_at is not None for s in others) < 8:  # they are decoding
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metrics(server)["ttserve_requests_running"] >= 8
    joined = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=10, temperature=0)
    for s in others:
        s.join()
    assert joined.choices[0].text == alone.choices[0].text
    assert joined.usage == alone.usage
    assert others[0].text == longest_alone.choices[0].text
    wait_idle(server)


def test_a_new_request_starts_before_running_ones_finish(server, client):
    runners = [Streamer(client, server.model_id, text_of(8, seed=10 + i), 48) for i in range(4)]
    deadline = time.monotonic() + 600
    while not all(r.first_at for r in runners):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    late = Streamer(client, server.model_id, text_of(12, seed=20), 4).join()
    for r in runners:
        r.join()
    assert late.first_at < min(r.done_at for r in runners)
    assert all(r.finish_reason == "length" for r in runners)
    wait_idle(server)


def test_fifty_requests_with_disconnects_return_every_page(server, client, paris):
    before = metrics(server).get('ttserve_requests_finished_total{reason="cancelled"}', 0)

    def one(i):
        close_after = 1 if i % 3 == 0 else None  # every third client leaves after its first chunk
        return Streamer(client, server.model_id, text_of(5 + i * 3, seed=100 + i), 24 if close_after else 6,
                        close_after).join()

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(one, range(50)))
    assert all(r.done_at for r in results)
    wait_idle(server)
    m = metrics(server)
    assert m["ttserve_kv_blocks_used"] == 0 and m["ttserve_requests_running"] == 0
    assert m['ttserve_requests_finished_total{reason="cancelled"}'] >= before + 10
    again = client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=12, temperature=0)
    assert again.choices[0].message.content == paris
