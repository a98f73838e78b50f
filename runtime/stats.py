"""Statistics of a generation call (Session.stats): what the reference's demo prints.

The one-time costs of opening a program (runtime.load: loading it, placing the weights,
the warm-up that compiles kernels; ttrun adds compiling it when it compiled it) are set
once and carried into every later call's statistics (`startup`), reported apart from time
to first token and tokens/s, as the reference's demo reports its load and compile times
apart."""
from __future__ import annotations

from dataclasses import dataclass, fields

# Set by runtime.load (compile_s by ttrun), kept by every generation call after it.
STARTUP_FIELDS = ("compile_s", "load_s", "weights_s", "weights_from", "warmup_prefill_s", "warmup_decode_s")


@dataclass
class Stats:
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    users: int = 0
    generated_tokens: int = 0
    compile_s: float = 0.0  # ttcompile, when ttrun compiled the program first (--model)
    load_s: float = 0.0  # runtime.load: read the program, open the device, place weights and state
    weights_s: float = 0.0  # of load_s, placing the weights (ttnn backend)
    weights_from: str = ""  # where they came from: "ttnn files", "converted, ttnn files written", ...
    warmup_prefill_s: float = 0.0  # the warm-up prefill (ttnn: kernel compilation, program cache)
    warmup_decode_s: float = 0.0  # the warm-up decode step

    @property
    def warmup_s(self) -> float:
        return self.warmup_prefill_s + self.warmup_decode_s

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.generated_tokens / total if total else 0.0

    def startup(self) -> dict:
        """The load and warm-up figures, for the next call's statistics to keep:
        Stats(users=..., **session.stats.startup())."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in STARTUP_FIELDS}

    def startup_summary(self) -> str:
        """Load and warm-up, one line ('' for statistics not made by runtime.load)."""
        if not self.load_s:
            return ""
        line = f"compile {self.compile_s:.2f} s, " if self.compile_s else ""
        line += f"load {self.load_s:.2f} s"
        if self.weights_from:
            line += f" (weights {self.weights_s:.2f} s, {self.weights_from})"
        if self.warmup_s:
            line += (f", warm-up {self.warmup_s:.2f} s (prefill {self.warmup_prefill_s:.2f} s, "
                     f"decode {self.warmup_decode_s:.2f} s)")
        else:
            line += ", no warm-up"
        return line

    def summary(self) -> str:
        run = (f"time to first token {self.time_to_first_token_s * 1000:.0f} ms, "
               f"{self.tokens_per_s_per_user:.1f} tokens/s/user, {self.tokens_per_s:.1f} tokens/s total "
               f"({self.users} users, {self.generated_tokens} tokens)")
        startup = self.startup_summary()
        return f"{startup}\n{run}" if startup else run
