"""`ttserve`: serve a compiled program over OpenAI's HTTP API.

    ttserve --program OUT [--host 127.0.0.1] [--port 8000] [--backend emulator|ttnn] [--max-waiting N]
"""
from __future__ import annotations

import argparse
import sys

SERVE_PACKAGES = ("fastapi", "uvicorn", "starlette", "prometheus_client", "anyio")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttserve", description="Serve a compiled program over OpenAI's HTTP API "
                                "(/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics).")
    p.add_argument("--program", required=True, help="artifact folder written by ttcompile")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="emulator", choices=["emulator", "ttnn"])
    p.add_argument("--max-waiting", type=int, default=128,
                   help="requests that may wait for a decode slot or KV pages; more are refused with 429")
    return p


def main(argv=None) -> int:
    from compiler.errors import EXIT_USER, missing_dependency

    args = build_parser().parse_args(argv)
    if args.max_waiting < 1:  # before the (slow) load
        print(f"ttserve: error: --max-waiting must be at least 1, got {args.max_waiting}", file=sys.stderr)
        return EXIT_USER
    try:
        import runtime
        from .server import Server

        session = runtime.load(args.program, backend=args.backend)
        server = Server(session, host=args.host, port=args.port, max_waiting=args.max_waiting)
        print(f"ttserve: serving {server.model_id} ({session.batch_size} decode slots, "
              f"{server.scheduler.blocks_total} KV blocks) at {server.url}", file=sys.stderr, flush=True)
        server.serve()
        return 0
    except ModuleNotFoundError as e:
        package = (e.name or "").split(".")[0]
        if package in SERVE_PACKAGES:
            print(f"ttserve: error: ttserve needs {package}: install the serve extras "
                  "(pip install 'ttcompile[serve]', or scripts/setup.sh in a checkout)", file=sys.stderr)
        else:
            print(f"ttserve: error: {missing_dependency(e, 'ttserve')}", file=sys.stderr)
        return EXIT_USER
    except ValueError as e:
        print(f"ttserve: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
