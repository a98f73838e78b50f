"""The serving engine (runtime/engine.py: ttserve's and the vLLM interface's device calls)
on the ttnn backend, mock N150: prompts whose last prefill chunk is mostly padding pass
ttnn's checks (paged_fill_cache wants a page-table entry for every block of the chunk:
the entries past the user's blocks are the null block), then a decode step."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from test_ttnn_backend import ROOT, TIMEOUT, ttnn_python  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # ttnn in another process

SCRIPT = """
import json, sys
import numpy as np
import runtime
from runtime.engine import Engine, NULL_BLOCK, Sampler

session = runtime.load(sys.argv[1], backend="ttnn")
engine = Engine(session)
calls = []
run = session.backend.run
def spy(name, inputs, scalars=None):
    if name == "prefill":
        calls.append([int(inputs["tokens"].shape[-1]), inputs["chunk_page_table"].reshape(-1).tolist()])
    return run(name, inputs, scalars)
session.backend.run = spy
rows = {0: engine.table_row([5]), 1: engine.table_row([9, 2, 7, 8, 11])}
engine.prefill(list(range(3, 23)), rows[0], 0)  # 20 tokens: 128 rows, 1 block of the user's
engine.prefill(list(range(3, 153)), rows[1], 1)  # 150 tokens: 256 rows in chunks of 128
table = np.stack([rows[0], rows[1]] + [engine.table_row([]) for _ in range(engine.batch_size - 2)])
positions = np.full(engine.batch_size, -1)
positions[:2] = [20, 150]
ids = engine.decode_tokens(np.zeros(engine.batch_size, dtype=np.int64), positions, table,
                           [Sampler(), Sampler()] + [None] * (engine.batch_size - 2))
print(json.dumps({"calls": calls, "null": NULL_BLOCK, "ids": ids[:2].tolist()}))
"""


def test_engine_prefill_and_decode_pass_ttnns_checks(ttnn_python, tiny_model, compile_artifact):
    out = compile_artifact(tiny_model("llama_plain"), batch_size=4, max_seq_len=256, max_num_blocks=16,
                           max_prefill_chunk=128)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TT_METAL_")}
    done = subprocess.run([str(ttnn_python), "-c", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    null = result["null"]
    # Every chunk names a block for each of its 4 blocks of rows; past the user's, the null block.
    assert result["calls"] == [[128, [5, null, null, null]], [128, [9, 2, 7, 8]], [128, [11, null, null, null]]]
    assert len(result["ids"]) == 2
