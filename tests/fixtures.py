"""Tiny checkpoints made by the tests themselves: HF (transformers) and Meta layouts."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_LLAMA = dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                  intermediate_size=328, vocab_size=1000, num_hidden_layers=2,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)


def hf_config(arch: str = "llama", **overrides):
    """A transformers config for a tiny Llama, Qwen2, Qwen3 or Mistral (odd sizes on purpose)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    params = {**TINY_LLAMA, "tie_word_embeddings": False, **overrides}
    if arch in ("qwen2", "qwen3"):
        params.setdefault("use_sliding_window", False)
        return (Qwen2Config if arch == "qwen2" else Qwen3Config)(**params)
    if arch == "mistral":
        return MistralConfig(**params)
    return LlamaConfig(**params)


def make_hf_model(path: Path, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None,
                  **overrides) -> Path:
    """Save a random tiny model as an HF directory (safetensors, float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger-than-default weights so that errors are visible
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if p.dim() == 1 and p.shape[0] in (config.hidden_size, getattr(config, "head_dim", None)):
                p.add_(1.0)  # norms (and Qwen3's q/k norms over head_dim) near one
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def hf_reference(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float()


def make_meta_model(hf_dir: Path, path: Path, shards: int = 1) -> Path:
    """Write the same weights as a Meta checkpoint: params.json + consolidated.NN.pth
    (Meta names, interleaved q/k rows, split over `shards` model-parallel files)."""
    from safetensors.torch import load_file

    from models_ref.weights import _meta_shard_dim, hf_to_meta_name, hf_to_meta_rows

    cfg = json.loads((hf_dir / "config.json").read_text())
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        for key, t in load_file(str(f)).items():
            name = hf_to_meta_name(key)
            if name.endswith("wq.weight"):
                t = hf_to_meta_rows(t, n_heads)
            elif name.endswith("wk.weight"):
                t = hf_to_meta_rows(t, n_kv)
            state[name] = t
    path.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        part = {}
        for name, t in state.items():
            dim = _meta_shard_dim(name)
            part[name] = t.clone() if dim is None or shards == 1 else t.chunk(shards, dim)[i].clone()
        torch.save(part, path / f"consolidated.{i:02d}.pth")
    d = cfg["hidden_size"]
    multiplier = cfg["intermediate_size"] / int(2 * 4 * d / 3)  # Meta's FFN rule, inverted
    params = {"dim": d, "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
              "n_kv_heads": n_kv, "vocab_size": cfg["vocab_size"], "multiple_of": 8,
              "ffn_dim_multiplier": multiplier, "norm_eps": cfg["rms_norm_eps"],
              "rope_theta": cfg.get("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta")),
              "use_scaled_rope": False, "max_seq_len": cfg["max_position_embeddings"]}
    (path / "params.json").write_text(json.dumps(params))
    return path


def pcc(a, b) -> float:
    a, b = torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def random_mllama(text: dict, vision: dict, image_token: int, gates: tuple[float, float] | None = (0.4, 1.2)):
    """A tiny HF Llama 3.2 Vision (MllamaForConditionalGeneration) with random weights, seed 0:
    matrices N(0, 0.08), vectors N(0, 0.3), norm weights around 1, and the scalar tanh gates
    uniform in `gates` (open, and not all alike; None: left random like the vectors)."""
    import re

    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision,
                                                        image_token_index=image_token)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if re.search(r"norm\.weight$", name):
                p.add_(1.0)
            if gates is not None and p.numel() == 1:
                p.uniform_(*gates)
    return model
