"""Statistics of a generation call (Session.stats): what the reference's demo prints."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    users: int = 0
    generated_tokens: int = 0

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.generated_tokens / total if total else 0.0

    def summary(self) -> str:
        return (f"time to first token {self.time_to_first_token_s * 1000:.0f} ms, "
                f"{self.tokens_per_s_per_user:.1f} tokens/s/user, {self.tokens_per_s:.1f} tokens/s total "
                f"({self.users} users, {self.generated_tokens} tokens)")
