"""The vLLM model interface (runtime/vllm_model.py), driven by a test that plays vLLM's
part: its own block allocator handing out scrambled blocks, batched prefill of the
sequences that join, then decode steps padded to the program's batch, with sequences
joining at different steps, rows reordered between steps and finished sequences' blocks
reused. Greedy tokens must equal what ttserve answers for the same prompts (the two share
runtime/engine.py), on the tiny model (fast) and on SmolLM2 (slow)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from runtime.vllm_model import TTCompiledForCausalLM
from serve_helpers import SMOLLM2_PROGRAM, TINY_PROGRAM, live_server, openai_client, tiny_chat_model


class PlaysVLLM:
    """vLLM's side of the interface: block manager, batching, greedy sampling on the host."""

    def __init__(self, model, kv_cache, num_blocks, block_size, max_batch, seed=0):
        self.model, self.kv_cache, self.block_size, self.max_batch = model, kv_cache, block_size, max_batch
        self.rng = np.random.default_rng(seed)
        self.free = (self.rng.permutation(num_blocks - 1) + 1).tolist()  # block 0: vLLM V1's null block
        self.eos = model.session.tokenizer.eos_token_ids
        self.running, self.done = [], {}

    def _grow(self, seq, positions):
        while len(seq["blocks"]) * self.block_size < positions:
            seq["blocks"].append(self.free.pop())

    def join(self, prompts: dict) -> None:
        """Prefill these sequences together (one prefill_forward call)."""
        assert len(self.running) + len(prompts) <= self.max_batch, "the schedule overfills the batch"
        seqs = []
        for name, (prompt, max_tokens) in prompts.items():
            seq = {"name": name, "prompt": prompt, "max_tokens": max_tokens, "blocks": [], "out": []}
            self._grow(seq, len(prompt))
            seqs.append(seq)
        longest = max(len(s["prompt"]) for s in seqs)
        widest = max(len(s["blocks"]) for s in seqs)
        tokens = torch.zeros(len(seqs), longest, dtype=torch.int64)
        table = torch.zeros(len(seqs), widest, dtype=torch.int32)
        for b, s in enumerate(seqs):
            tokens[b, : len(s["prompt"])] = torch.tensor(s["prompt"])
            table[b, : len(s["blocks"])] = torch.tensor(s["blocks"])
        lens = torch.tensor([len(s["prompt"]) for s in seqs])
        logits = self.model.prefill_forward(tokens, table, self.kv_cache, lens)
        assert logits.shape == (len(seqs), 1, self.model.engine.vocab_size) and isinstance(logits, torch.Tensor)
        for b, s in enumerate(seqs):
            self._take(s, int(logits[b, 0].argmax()))
        self.running += [s for s in seqs if s["name"] not in self.done]

    def step(self) -> None:
        """One decode step of every running sequence, in a shuffled row order."""
        order = self.rng.permutation(len(self.running)).tolist()
        rows = [self.running[i] for i in order]
        tokens = torch.zeros(self.max_batch, 1, dtype=torch.int64)
        positions = torch.full((self.max_batch,), -1, dtype=torch.int64)  # vLLM pads with -1
        for s in rows:
            self._grow(s, len(s["prompt"]) + len(s["out"]))
        table = torch.zeros(self.max_batch, max(len(s["blocks"]) for s in rows) + 3, dtype=torch.int32)
        for b, s in enumerate(rows):
            tokens[b, 0] = s["out"][-1]
            positions[b] = len(s["prompt"]) + len(s["out"]) - 1
            table[b, : len(s["blocks"])] = torch.tensor(s["blocks"])
        pending = self.model.decode_forward(tokens, positions, table, self.kv_cache, read_from_device=False)
        logits = self.model.read_decode_output(pending, len(rows))
        assert logits.shape == (len(rows), 1, self.model.engine.vocab_size)
        for b, s in enumerate(rows):
            self._take(s, int(logits[b, 0].argmax()))
        self.running = [s for s in self.running if s["name"] not in self.done]

    def _take(self, seq, token: int) -> None:
        seq["out"].append(token)
        if token in self.eos or len(seq["out"]) >= seq["max_tokens"]:
            self.done[seq["name"]] = seq["out"]
            self.free += seq["blocks"]  # reused, in another order, by later sequences

    def run(self, schedule: dict, steps: int) -> dict:
        """schedule: decode step -> {name: (prompt ids, max_tokens)} joining before it."""
        for step in range(steps):
            if step in schedule:
                self.join(schedule[step])
            if self.running:
                self.step()
        assert not self.running, "give more steps"
        return self.done


def vllm_model(program, max_batch, max_seq_len):
    from runtime.session import read_artifact

    cls = TTCompiledForCausalLM.for_program(program)
    model_config = read_artifact(program)[0].model
    hf_config = SimpleNamespace(vocab_size=model_config["vocab_size"], num_hidden_layers=model_config["n_layers"],
                                hidden_size=model_config["dim"], _name_or_path="unused")
    return cls.initialize_vllm_model(hf_config, None, max_batch, max_seq_len)


def allocate(model):
    program = model.session.program
    shape = (int(program.options["max_num_blocks"]), int(program.model["n_kv_heads"]),
             int(program.options["block_size"]), int(program.model["head_dim"]))
    return model.allocate_kv_cache(shape, torch.bfloat16, program.model["n_layers"])


def server_answers(server, prompts: dict) -> dict:
    """name -> (text, completion_tokens) from ttserve, greedy, prompts as token ids."""
    client = openai_client(server)
    out = {}
    for name, (ids, max_tokens) in prompts.items():
        r = client.completions.create(model=server.model_id, prompt=ids, max_tokens=max_tokens, temperature=0)
        out[name] = (r.choices[0].text, r.usage.completion_tokens)
    return out


def check_same(done: dict, answers: dict, tokenizer) -> None:
    for name, (text, count) in answers.items():
        assert (tokenizer.decode(done[name]), len(done[name])) == (text, count), name


def prompt_ids(tokenizer, n, seed):
    rng = np.random.default_rng(seed)
    words = ["the", "river", "of", "light", "under", "seven", "bridges", "sang", "quietly", "while"]
    text = " ".join(rng.choice(words, size=n))
    return tokenizer.encode(text)


# ------------------------------------------------------------------ tiny model (fast)
@pytest.fixture(scope="module")
def tiny_program(tiny_model, smollm2_dir, compile_artifact):
    return compile_artifact(tiny_chat_model(tiny_model, smollm2_dir), **TINY_PROGRAM)


def test_vllm_interface_equals_the_server_tiny(tiny_program):
    model = vllm_model(tiny_program, max_batch=4, max_seq_len=256)
    kv_cache = allocate(model)
    tok = model.session.tokenizer
    schedule = {0: {"a": (prompt_ids(tok, 20, 0), 12), "b": (prompt_ids(tok, 150, 1), 9)},
                3: {"c": (prompt_ids(tok, 5, 2), 14)},
                8: {"d": (prompt_ids(tok, 60, 3), 10)},  # joins as b leaves, reusing its blocks
                12: {"e": (prompt_ids(tok, 33, 4), 7)}}
    vllm = PlaysVLLM(model, kv_cache, num_blocks=20, block_size=32, max_batch=4)
    done = vllm.run(schedule, steps=40)
    with live_server(tiny_program) as server:
        answers = server_answers(server, {k: v for joining in schedule.values() for k, v in joining.items()})
    check_same(done, answers, tok)


def test_vllm_interface_checks_its_inputs(tiny_program):
    cls = TTCompiledForCausalLM.for_program(tiny_program)
    config = SimpleNamespace(vocab_size=49152, num_hidden_layers=2, hidden_size=192)
    with pytest.raises(ValueError, match="--batch-size 8"):
        cls.initialize_vllm_model(config, None, 8, 256)
    with pytest.raises(ValueError, match="--max-seq-len 1024"):
        cls.initialize_vllm_model(config, None, 4, 1024)
    with pytest.raises(ValueError, match="num_hidden_layers=3"):
        cls.initialize_vllm_model(SimpleNamespace(num_hidden_layers=3), None, 4, 256)
    with pytest.raises(ValueError, match="tt_program"):
        TTCompiledForCausalLM.initialize_vllm_model(config, None, 4, 256)
    bound = TTCompiledForCausalLM.initialize_vllm_model(
        SimpleNamespace(tt_program=str(tiny_program), **vars(config)), None, 4, 256)  # vLLM --hf-overrides
    assert bound.engine.batch_size == 4
    model = cls.initialize_vllm_model(config, None, 4, 256)
    with pytest.raises(ValueError, match="allocate_kv_cache"):
        model.prefill_forward(torch.tensor([[1, 2]]), torch.tensor([[0]]), None, torch.tensor([2]))
    with pytest.raises(ValueError, match="--block-size 32"):
        model.allocate_kv_cache((20, 2, 16, 32), torch.bfloat16, 2)
    with pytest.raises(ValueError, match="--max-num-blocks 64"):
        model.allocate_kv_cache((64, 2, 32, 32), torch.bfloat16, 2)
    kv_cache = model.allocate_kv_cache((20, 2, 32, 32), torch.bfloat16, 2)
    assert len(kv_cache) == 1 and len(kv_cache[0]) == 2 and kv_cache[0][1][0].name == "layers.1.attention.k_cache"
    with pytest.raises(ValueError, match="not allocated by this model"):
        model.prefill_forward(torch.tensor([[1, 2]]), torch.tensor([[0]]), [[]], torch.tensor([2]))
    with pytest.raises(ValueError, match="needs 2"):
        model.prefill_forward(torch.ones(1, 40, dtype=torch.int64), torch.tensor([[3]]), kv_cache, torch.tensor([40]))
    tokens = model.decode_forward(torch.tensor([[5]]), torch.tensor([0]), torch.tensor([[3]]), kv_cache,
                                  sampling_params=SimpleNamespace(temperature=0.0))
    assert tokens.shape == (1, 1) and tokens.dtype == torch.int64  # greedy on the "device"
    logits = model.decode_forward(np.array([[5]]), np.array([0]), np.array([[3]]), kv_cache)
    assert isinstance(logits, np.ndarray) and int(logits[0, 0].argmax()) == int(tokens[0, 0])


# ------------------------------------------------------------------ SmolLM2 (slow)
@pytest.mark.slow
def test_vllm_interface_equals_the_server_smollm2(smollm2_dir, compile_artifact):
    program = compile_artifact(smollm2_dir, **SMOLLM2_PROGRAM)
    model = vllm_model(program, max_batch=32, max_seq_len=512)
    kv_cache = allocate(model)
    tok = model.session.tokenizer
    chat = tok.apply_chat_template("What is the capital of France?")
    schedule = {0: {"paris": (chat, 10), "long": (prompt_ids(tok, 200, 1), 8)},
                2: {"short": (prompt_ids(tok, 6, 2), 9)},
                4: {"mid": (prompt_ids(tok, 70, 3), 8), "chat2": (tok.apply_chat_template("Name a fruit."), 8)}}
    vllm = PlaysVLLM(model, kv_cache, num_blocks=512, block_size=32, max_batch=32, seed=1)
    done = vllm.run(schedule, steps=30)
    assert "Paris" in tok.decode(done["paris"])
    with live_server(program) as server:
        answers = server_answers(server, {k: v for joining in schedule.values() for k, v in joining.items()})
    check_same(done, answers, tok)
