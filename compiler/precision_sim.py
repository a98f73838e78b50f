"""The model `--precision auto` measures: the reference decoder on the CPU, with weights
rounded as ttnn stores them and, optionally, activations rounded as the device's matmuls see them.

Expects: a text-only model config and its checkpoint reader.
Guarantees: `Model.hidden` runs every row of a prompt (a causal prefill, which teacher
forcing equals) through the layers under the weight dtypes `assign` set, and returns the
final normed rows; with device=False it is the float32 reference module, with device=True
it rounds where the compiled program's rounding moves top-1 most:
  - every matmul's activation is bfloat16 with its last mantissa bit dropped: at HiFi2 and
    LoFi (every decoder and LM head matmul the search plans) the matrix unit takes the
    SrcB operand's high 7 significant bits only (runtime/emulator/fidelity.py), a bias
    toward zero that every matmul repeats;
  - the embeddings, the residual stream after each add and the logits are bfloat16;
  - LoFi takes the weight's high 5 significant bits, which bfloat4_b (the only dtype the
    search pairs with LoFi) already fits, so weights need nothing more than their dtype.
Not modelled (the search's margin covers them): bfloat16 matmul outputs inside a layer
(rounding them too moved SmolLM2's GPL-3 top-1 by under 0.02 either way, at twice the
cost), bfloat16 inside attention (rotary, softmax, the KV cache), norms in float32.
Measured on SmolLM2-135M over GPL-3 against HF float32, this model / the emulator (matmuls
at device fidelity): accuracy mode top-1 0.949 / 0.953, performance 0.805 / 0.801,
accuracy with bfloat8_b attention 0.949 / 0.941.
"""
from __future__ import annotations

import torch
from torch import nn

SRC_B_HIGH = -(1 << 32) + 0xFFFE0000  # float32 bits of SrcB's first pass (fidelity.HIGH_BITS["B"])


def _round(w: torch.Tensor, dtype: str) -> torch.Tensor:
    """An nn.Linear weight [N, K] as the device stores it ([K, N] tiles), back in float32."""
    from runtime.emulator.ops import quantize_like
    return quantize_like(w.t().contiguous(), dtype).float().t().contiguous()


def weight_bytes(w: torch.Tensor, dtype: str) -> int:
    """Device bytes of an nn.Linear weight [N, K] stored as `dtype`."""
    from runtime.blockfloat import bytes_for
    return bytes_for(list(w.t().shape), dtype)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.bfloat16().float()


def src_b(x: torch.Tensor) -> torch.Tensor:
    """A matmul activation as HiFi2/LoFi multiply it: bfloat16, its last mantissa bit dropped."""
    return (bf16(x).view(torch.int32) & SRC_B_HIGH).view(torch.float32)


class Model:
    """The reference decoder with the checkpoint's weights; runs all rows of a prompt under
    a per-weight dtype assignment."""

    def __init__(self, cfg, reader, rows: int):
        from compiler.convert import RecipeEvaluator
        from models_ref.modules import Transformer
        from models_ref.rope import cos_sin_tables

        with torch.device("meta"):
            module = Transformer(cfg, "prefill", 1, rows)
        module = module.to_empty(device="cpu")
        if cfg.tie_word_embeddings:  # to_empty makes two tensors of the tied one
            module.output.weight = module.tok_embeddings.weight
        evaluate = RecipeEvaluator(reader, cfg)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(evaluate(["source", name]).float())
            cos, sin = cos_sin_tables(cfg, rows)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
        self.module, self.cfg = module.eval(), cfg
        self.head_name = "tok_embeddings.weight" if cfg.tie_word_embeddings else "output.weight"
        module.requires_grad_(False)  # fisher_probes asks for gradients of activations only
        self.params = dict(module.named_parameters())
        self.exact = {n: p.detach().clone() for n, p in self.params.items()}
        self.rounded: dict[tuple[str, str], torch.Tensor] = {}
        self.device = False  # round activations as the device (set by layer)
        self._last: tuple = (None, None)  # the last matmul activation and its SrcB value
        for linear in module.layers.modules():
            if isinstance(linear, nn.Linear):
                linear.register_forward_pre_hook(self._activation)

    def _activation(self, _module, args):
        if not self.device:
            return None
        if self._last[0] is not args[0]:  # wq, wk, wv (and w1, w3) read the same rows
            self._last = (args[0], src_b(args[0]))
        return (self._last[1], *args[1:])

    def weight(self, name: str, dtype: str) -> torch.Tensor:
        if (name, dtype) not in self.rounded:
            self.rounded[(name, dtype)] = _round(self.exact[name], dtype)
        return self.rounded[(name, dtype)]

    def assign(self, dtypes: dict[str, str | None]) -> None:
        """Set every named weight to its rounded values (None: exact)."""
        with torch.no_grad():
            for name, dtype in dtypes.items():
                self.params[name].copy_(self.exact[name] if dtype is None else self.weight(name, dtype))

    def rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, cos rows, sin rows) for prompt rows 0..n-1."""
        from models_ref import ops
        positions = torch.arange(n)
        m = self.module
        return positions, ops.rope_rows(m.rope_cos, positions, False), ops.rope_rows(m.rope_sin, positions, False)

    @torch.no_grad()
    def layer(self, i: int, x: torch.Tensor, rope, device: bool) -> torch.Tensor:
        """Decoder layer i on rows x (the residual rounded after each add on the device)."""
        return self._layer(i, x, rope, device)

    def _layer(self, i: int, x: torch.Tensor, rope, device: bool) -> torch.Tensor:
        block, (positions, cos, sin) = self.module.layers[i], rope
        self.device = device
        rnd = bf16 if device else (lambda t: t)
        h = rnd(x + block.attention(block.attention_norm(x), cos, sin, positions, 0))
        return rnd(h + block.feed_forward(block.ffn_norm(h)))

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, device: bool, start: int = 0, x=None,
               keep: list | None = None) -> torch.Tensor:
        """Run layers start.. on x (None: embed `tokens` [1, n]); returns the final normed rows
        [n, dim]. `keep`: each layer's input from `start` on, then the last layer's output,
        are appended to it (so keep[i] can restart the run at layer i)."""
        from models_ref import ops
        m, rope = self.module, self.rope(tokens.shape[-1])
        if x is None:
            x = ops.embed(tokens, m.tok_embeddings.weight)
            x = bf16(x) if device else x
        for i in range(start, len(m.layers)):
            if keep is not None:
                keep.append(x)
            x = self.layer(i, x, rope, device)
        if keep is not None:
            keep.append(x)
        return m.norm(x)[0, 0]

    def fisher_probes(self, tokens: torch.Tensor, head: torch.Tensor, samples: int,
                      seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each layer's input, then the last output; the gradients of log p(y) at each
        layer's output [samples, n, dim]) in float32 under the current weights, for next
        tokens y drawn from the model's own distribution at every row (seeded). A change d
        to layer i's output moves the logits by a KL of about mean((g . d)^2) / 2 over
        them: the Fisher information, so one backward pass per sample weighs a change by
        its effect on the output through every later layer."""
        from models_ref import ops
        m, rope = self.module, self.rope(tokens.shape[-1])
        with torch.enable_grad():
            x = ops.embed(tokens, m.tok_embeddings.weight).detach().requires_grad_()
            keep, outs = [x], []
            for i in range(len(m.layers)):
                x = self._layer(i, x, rope, device=False)
                outs.append(x)
                keep.append(x)
            h = m.norm(x)[0, 0]
            p = torch.softmax(h.detach() @ head.t(), dim=-1)
            drawn = torch.multinomial(p, samples, replacement=True, generator=torch.Generator().manual_seed(seed))
            # d log p(y) / dh = head[y] - E_p[head]: no backward through the head; the
            # samples go through one batched backward pass
            at_h = head[drawn.t()] - (p @ head)[None]
            grads = torch.autograd.grad(h, outs, grad_outputs=at_h, is_grads_batched=True)
        return [k.detach() for k in keep], [g[:, 0, 0] for g in grads]

    def logits(self, h: torch.Tensor, head: torch.Tensor, device: bool) -> torch.Tensor:
        """The LM head on final normed rows, with `head` the weight [vocab, dim] as stored."""
        return bf16(src_b(h) @ head.t()) if device else h @ head.t()
