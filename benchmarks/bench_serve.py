"""ttserve under load: SmolLM2 on the emulator, a 32-slot program, streaming clients.

    .venv/bin/python benchmarks/bench_serve.py [--program OUT] [--max-tokens 32] [--clients 1 8 32]

For each number of concurrent clients C: C streaming completions at once (one request
per client, different prompts, greedy), then the same C requests one after another. Prints
aggregate generated tokens/s of both and their ratio, p50/p99 time to first token and
time per output token (per request: (last - first token) / (tokens - 1)), the same
prompts through the static batch path (Session.generate, every user starts and ends with
the batch), and the server's peak RSS (VmHWM of the ttserve process) under the 32-client
load. The server runs as a `ttserve` subprocess; clients are httpx in asyncio.

Figures only, no assertions; a shared 2-core machine makes them noisy.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
TOPICS = ["a lighthouse", "the moon", "a lost key", "an old violin", "a desert town", "a robot gardener",
          "winter in Oslo", "a paper boat", "the first train", "a quiet library", "a stubborn cat", "rain",
          "a mountain pass", "a clockmaker", "the deep sea", "a market at dawn"]


def ensure_program(batch: int) -> Path:
    out = ROOT / "build" / f"bench-serve-SmolLM2-N150-b{batch}"
    if not (out / "program.json").exists():
        subprocess.run([sys.executable, "-m", "compiler.cli", str(MODEL), "--target", "N150", "--optimizations",
                        "accuracy", "--batch-size", str(batch), "--max-seq-len", "512", "--max-num-blocks",
                        str(batch * 16), "-o", str(out), "-q"], check=True, cwd=ROOT)
    return out


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})." for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    return {"ttft": (first or last or time.perf_counter()) - start, "tokens": tokens,
            "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None}


async def load(url: str, model: str, texts: list[str], max_tokens: int, concurrent: bool) -> tuple[float, list]:
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=64)) as client:
        start = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*[one_request(client, url, model, t, max_tokens) for t in texts])
        else:
            results = [await one_request(client, url, model, t, max_tokens) for t in texts]
        return time.perf_counter() - start, results


def percentile(values, q):
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else float("nan")


def static_session(program: Path):
    """A session of the same program in this process, warmed up as the server is."""
    import runtime

    session = runtime.load(program)
    session.generate(prompts(2), max_generated_tokens=4, temperature=0.0)
    return session


def static_batch(session, texts: list[str], max_tokens: int) -> tuple[float, float, int]:
    """(wall s, CPU s, tokens) of Session.generate over `texts` as one static batch."""
    start, cpu = time.perf_counter(), time.process_time()
    session.generate(texts, max_generated_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - start, time.process_time() - cpu, session.stats.generated_tokens


def rate(tokens: int, wall: float, cpu: float) -> str:
    """tokens/s of wall time (tokens per CPU-second in parentheses: steadier on a shared machine)."""
    return f"{tokens / wall:.1f} ({tokens / cpu:.1f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program", help="a SmolLM2 artifact with 32 decode slots (default: compile one into build/)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--no-static", action="store_true", help="skip the static-batch comparison")
    args = p.parse_args()
    program = Path(args.program) if args.program else ensure_program(32)
    static = None if args.no_static else static_session(program)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).with_name("ttserve")), "--program", str(program),
                               "--port", str(port)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("ttserve did not start")
            time.sleep(0.2)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        idle_rss, _ = peak_rss_mb(server.pid)
        asyncio.run(load(url, model, prompts(2), 4, concurrent=True))  # warm up
        print(f"ttserve {model}, {program.name}, max_tokens {args.max_tokens}, greedy, "
              f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}); server RSS idle {idle_rss:.0f} MB\n")
        header = (f"{'clients':>7} | {'concurrent tok/s':>16} | {'one-by-one tok/s':>16} | {'ratio':>5} | "
                  f"{'TTFT p50/p99 s':>15} | {'TPOT p50/p99 s':>15} | {'static batch tok/s':>18}")
        print("tok/s: generated tokens per second of wall time; in parentheses, per CPU-second of the "
              "server (static batch: of this process)\n")
        print(header + "\n" + "-" * len(header), flush=True)
        peak_under_32 = None
        for clients in args.clients:
            texts = prompts(clients)
            cpu = cpu_seconds(server.pid)
            wall, results = asyncio.run(load(url, model, texts, args.max_tokens, concurrent=True))
            cpu = cpu_seconds(server.pid) - cpu
            if clients == max(args.clients):
                peak_under_32 = peak_rss_mb(server.pid)[1]
            tokens = sum(r["tokens"] for r in results)
            seq_cpu = cpu_seconds(server.pid)
            seq_wall, seq_results = asyncio.run(load(url, model, texts, args.max_tokens, concurrent=False))
            seq_cpu = cpu_seconds(server.pid) - seq_cpu
            seq_tokens = sum(r["tokens"] for r in seq_results)
            static_rate = "-"
            if static is not None:
                static_wall, static_cpu, static_tokens = static_batch(static, texts, args.max_tokens)
                static_rate = rate(static_tokens, static_wall, static_cpu)
            ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
            print(f"{clients:>7} | {rate(tokens, wall, cpu):>16} | {rate(seq_tokens, seq_wall, seq_cpu):>16} | "
                  f"{(tokens / wall) / (seq_tokens / seq_wall):>5.2f} | "
                  f"{percentile(ttft, 50):>6.2f} / {percentile(ttft, 99):<6.2f} | "
                  f"{percentile(tpot, 50):>6.3f} / {percentile(tpot, 99):<6.3f} | {static_rate:>18}", flush=True)
        print(f"\nserver peak RSS (VmHWM) after the {max(args.clients)}-client load: {peak_under_32:.0f} MB")
        metrics = httpx.get(url + "/metrics").text
        used = [line for line in metrics.splitlines() if line.startswith("ttserve_kv_blocks_used")]
        print(f"after the runs: {used[0]}; load average {os.getloadavg()[0]:.1f}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
