"""Continuous batching: the scheduler owns the program's decode slots and its KV page pool,
and runs every device call of the server in one thread (the engine thread; backends are
not thread-safe). HTTP handlers talk to it only through `submit` and `cancel` (thread-safe)
and the events each request's `sink` receives.

One iteration (`step`) of the engine thread:
1. take in new requests and cancellations (a cancelled user is retired at once);
2. admit waiting requests, first come first served, while a slot is free and the pool
   holds the request's whole reservation (runtime.schedule.reservation: all or nothing,
   so a request that does not fit never disturbs another's pages);
3. prefill: one chunk of the oldest admitted prompt when users are decoding (so they wait
   at most one chunk between steps), or every pending chunk when nobody is;
4. decode: one step of every decoding user, then retire those that finished (EOS,
   max_tokens, a stop string), returning their pages to the pool at once.

What it guarantees:
- a request that can never fit (prompt plus max_tokens beyond the context) is refused at
  `submit` (NeverFits); past `max_waiting` waiting requests, `submit` refuses (QueueFull);
- each user reads and writes only its own blocks (its own page-table row), so what one
  request does cannot change another's tokens; a request whose prefill fails gets an
  error event and its pages back, and the others go on;
- pages are returned when a user finishes, is cancelled, or fails: once every request has
  ended, `blocks_used` is 0.

Torch-free and HTTP-free: tests drive `step()` directly.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import schedule
from ..engine import NULL_BLOCK, Engine, Sampler
from ..pages import PageAllocator

log = logging.getLogger("ttserve")


class NeverFits(ValueError):
    """The request can never run on this program (HTTP 400); `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """Too many requests are waiting (HTTP 429)."""


@dataclass
class Event:
    """What a request's sink receives: "token" (one generated token and the text it made
    sendable), "done" (finish_reason: stop, length or cancelled) or "error" (message)."""

    kind: str
    token: int = -1
    text: str = ""
    finish_reason: str | None = None
    message: str | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request. `text` (a TextStream) turns tokens into text and watches
    the stop strings; without it the request deals in token ids only."""

    prompt: list[int]
    max_tokens: int
    sampler: Sampler = field(default_factory=Sampler)
    sink: Callable[[Event], None] = lambda event: None
    text: object = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # The engine thread's bookkeeping.
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int]] = field(default_factory=list)  # prefill calls still to run
    finish_reason: str | None = None
    arrived_at: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    @property
    def decoding(self) -> bool:
        return self.slot is not None and not self.chunks


class Scheduler:
    def __init__(self, session, max_waiting: int = 128, listener=None, clock=time.perf_counter):
        self.engine = Engine(session)
        engine = self.engine
        self.pages = PageAllocator(engine.num_blocks, engine.block_size, engine.blocks_per_user,
                                   first_block=NULL_BLOCK + 1)
        self.slots: list[Request | None] = [None] * engine.batch_size
        self.waiting: deque[Request] = deque()
        self.max_waiting = max_waiting
        self.listener = listener  # metrics: first_token(s), token(), finished(request)
        self.clock = clock
        try:
            self.eos = session.tokenizer.eos_token_ids
        except ValueError:  # a program without tokenizer files serves token ids, no EOS
            self.eos = frozenset()
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._cancel: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------ any thread
    def check(self, prompt_len: int, max_tokens: int) -> None:
        """Raise NeverFits when a request could never run on this program."""
        context = self.engine.max_seq_len
        if prompt_len < 1:
            raise NeverFits("the prompt is empty: give at least one token", "prompt")
        if max_tokens < 1:
            raise NeverFits(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if prompt_len >= context:
            raise NeverFits(f"the prompt has {prompt_len} tokens; this program's context is {context} "
                            "tokens, and at least one must be left to generate", "prompt")
        if prompt_len + max_tokens > context:
            raise NeverFits(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds this "
                            f"program's context of {context} tokens; ask for at most "
                            f"{context - prompt_len} tokens", "max_tokens")
        blocks = self.pages.blocks_for(schedule.reservation(prompt_len, max_tokens, context))
        if blocks > self.pages.num_blocks:
            raise NeverFits(f"the request needs {blocks} KV blocks, the program's pool has "
                            f"{self.pages.num_blocks}", "max_tokens")

    def submit(self, request: Request) -> None:
        """Queue a request (NeverFits, QueueFull when it cannot be)."""
        self.check(len(request.prompt), request.max_tokens)
        with self._lock:
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the engine thread has stopped")
            if len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; retry later")
            request.arrived_at = self.clock()
            self._inbox.append(request)
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """Retire a request at the next step boundary (a no-op once it has ended)."""
        with self._lock:
            self._cancel.add(request_id)
            self._lock.notify()

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def waiting_count(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def blocks_used(self) -> int:
        return self.pages.num_blocks - self.pages.free_blocks

    @property
    def blocks_total(self) -> int:
        return self.pages.num_blocks

    def start(self) -> None:
        """Run the engine thread until stop()."""
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="ttserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self._cancel or self.waiting or self.running):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                busy = self.step()
            except Exception:  # a bug: keep serving, fail who was running
                log.exception("engine step failed")
                for request in list(filter(None, self.slots)):
                    self._fail(request, "internal error in the engine step (see the server log)")
                busy = True
            if not busy:  # requests wait for pages no running user holds: cannot happen, do not spin
                with self._lock:
                    self._lock.wait(0.05)
        for request in [*filter(None, self.slots), *self.waiting, *self._inbox]:
            self._emit(request, Event("error", message="the server is shutting down"))
            self._release(request)

    def step(self) -> bool:
        """One iteration: intake, admission, prefill, one decode step, retirement.
        Returns False when there was nothing to do."""
        self._intake()
        self._admit()
        prefilled = self._prefill()
        decoded = self._decode()
        return prefilled or decoded

    def _intake(self) -> None:
        with self._lock:
            arrived, self._inbox = self._inbox, []
            cancelled, self._cancel = self._cancel, set()
        self.waiting.extend(arrived)
        if not cancelled:
            return
        for request in [r for r in self.waiting if r.id in cancelled]:
            self.waiting.remove(request)
            self._finish(request, "cancelled")
        for request in self.slots:
            if request is not None and request.id in cancelled:
                self._finish(request, "cancelled")

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            request = self.waiting[0]
            tokens = schedule.reservation(len(request.prompt), request.max_tokens, self.engine.max_seq_len)
            if self.pages.blocks_for(tokens) > self.pages.free_blocks:
                return  # the pool is full: it waits (first come, first served)
            slot = self.slots.index(None)
            self.waiting.popleft()
            self.pages.reserve(slot, tokens)
            request.slot, request.admitted_at = slot, self.clock()
            request.chunks = self.engine.chunks(len(request.prompt))
            self.slots[slot] = request
            try:  # programs with per-slot state (Llama 3.2 Vision): this user has no image
                self.engine.session.images.load(slot, request.prompt, None)
            except Exception as e:
                self._fail(request, f"admission failed: {e}")

    def _prefill(self) -> bool:
        ran = 0
        while True:
            pending = [r for r in self.slots if r is not None and r.chunks]
            decoding = any(r is not None and r.decoding for r in self.slots)
            if not pending or (decoding and ran):
                return ran > 0
            request = min(pending, key=lambda r: r.admitted_at)
            start, rows = request.chunks.pop(0)
            try:
                logits = self.engine.prefill_chunk(request.prompt, start, rows,
                                                   self.pages.row(request.slot), request.slot)
            except Exception as e:
                log.exception("prefill of %s failed", request.id)
                self._fail(request, f"prefill failed: {e}")
                continue
            ran += 1
            if logits is not None:
                request.chunks = []
                self._accept(request, request.sampler.choose(logits))

    def _decode(self) -> bool:
        users = [r for r in self.slots if r is not None and r.decoding]
        if not users:
            return False
        batch = self.engine.batch_size
        tokens = np.zeros(batch, dtype=np.int64)
        positions = np.full(batch, -1, dtype=np.int64)
        samplers = [None] * batch
        for r in users:
            tokens[r.slot] = r.generated[-1]
            positions[r.slot] = len(r.prompt) + len(r.generated) - 1
            samplers[r.slot] = r.sampler
        table = self.pages.table(batch)
        chosen = self.engine.decode_tokens(tokens, positions, table, samplers)
        for r in users:
            self._accept(r, int(chosen[r.slot]))
        return True

    def _accept(self, request: Request, token: int) -> None:
        """A user's new token: send it, then retire the user if it has finished."""
        now = self.clock()
        if request.first_token_at is None:
            request.first_token_at = now
            if self.listener is not None:
                self.listener.first_token(now - request.arrived_at)
        request.last_token_at = now
        request.generated.append(token)
        if self.listener is not None:
            self.listener.token()
        if token in self.eos:
            self._emit(request, Event("token", token))
            self._finish(request, "stop")
            return
        text, stopped = request.text.push(token) if request.text is not None else ("", False)
        self._emit(request, Event("token", token, text))
        if stopped:
            self._finish(request, "stop")
        elif len(request.generated) >= request.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: Request, reason: str) -> None:
        if request.text is not None and reason != "cancelled":
            tail = request.text.flush()
            if tail:
                self._emit(request, Event("token", -1, tail))
        request.finish_reason, request.finished_at = reason, self.clock()
        self._release(request)
        if self.listener is not None:
            self.listener.finished(request)
        self._emit(request, Event("done", finish_reason=reason))

    def _fail(self, request: Request, message: str) -> None:
        request.finish_reason, request.finished_at = "error", self.clock()
        self._release(request)
        if self.listener is not None:
            self.listener.finished(request)
        self._emit(request, Event("error", message=message))

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.pages.release(request.slot)
            self.slots[request.slot] = None
            request.slot = None
        request.chunks = []

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:  # the client's side is gone: retire the request at the next step
            with self._lock:
                self._cancel.add(request.id)
