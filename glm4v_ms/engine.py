"""The serving engine: one thread owns the model and decodes every admitted request together (continuous batching).

Callers (the HTTP server, tests) only `submit` work and read what comes back through the listener they pass; the
listener runs on the engine thread, so it must only hand the event on (e.g. `loop.call_soon_threadsafe`).

Rows: `max_num_seqs` rows of one static KV cache of `max_model_len` slots each (llama.cpp's per-slot context).
A request waiting in the bounded queue is prefilled into a free row as soon as one exists, while the other rows
keep their state; then every step decodes all rows with the one compiled (rows, 1) graph (generation.Batch.step,
the same loop body model.generate() runs). A finished or cancelled request frees its row at the next step.
A lone request runs in a separate one-row cache instead (the (1, 1) graph: a step of all rows costs ~2.5x one
row's on CPU); it moves into the big cache, by a copy of its cache row, when a second request arrives, and back
when it is alone again. Two compiled decode graphs in all, whatever the traffic.

Prefix reuse (prefix_reuse=True, the server's default): a row that finishes remembers what its cache holds; a new
request goes to the free row whose cache shares the longest prefix of token ids with its prompt (images compared by
their pixels), and only the rest of the prompt is prefilled (a chat's next turn skips its history and images).

Not done: chunked prefill interleaved with decode steps (a long prompt's prefill stalls the other rows for its
duration).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from .generation import Batch, GenerationConfig, GenerationError, Sequence, thinking_force
from .model import _np, prompt_bucket


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is full: try again later (HTTP 503)."""


class Request:
    """A submitted prompt: cancel() from any thread stops it (waiting: never admitted; running: its row is freed
    at the engine's next step). The listener hears ("token", id), then ("done", finish_reason) or ("error", msg)."""

    def __init__(self, inputs: dict, seq: Sequence, prompt_tokens: int):
        self.inputs, self.seq, self.prompt_tokens = inputs, seq, prompt_tokens
        self.submitted = time.perf_counter()
        self.first_token_s = None
        self.reused_tokens = 0    # prompt tokens taken from a row's remembered cache (prefix reuse)

    def cancel(self):
        self.seq.cancel()

    @property
    def tokens(self) -> list:
        return self.seq.tokens


class Engine:
    def __init__(self, model, max_num_seqs: int = 4, max_model_len: int | None = None, max_queue: int = 64,
                 prefix_reuse: bool = False):
        ctx = model.config.text.max_position_embeddings
        self.model = model
        self.max_model_len = min(int(max_model_len or min(ctx, 8192)), ctx)
        if max_num_seqs < 1 or self.max_model_len < 64:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 64")
        self.max_num_seqs = max_num_seqs
        # both caches remember what their rows hold (prefix reuse), so a row keeps its record when it moves
        self.batch = Batch.empty(model, max_num_seqs, self.max_model_len, prefix_reuse)
        self.solo = Batch.empty(model, 1, self.max_model_len, prefix_reuse) if max_num_seqs > 1 else None
        self.waiting = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread = None
        self.steps = 0            # decode steps run (for tests and /health)
        self.moves = 0            # rows handed between the one-row and the big cache
        self.error = None         # an unexpected failure that stopped the engine thread

    # ------------------------------------------------------------------ client side (any thread)
    def check_prompt(self, prompt_tokens: int, max_new_tokens: int | None) -> int:
        """The number of new tokens a prompt of this length may make, or GenerationError when it does not fit."""
        room = self.max_model_len - prompt_bucket(prompt_tokens)
        if room < 1:
            raise GenerationError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                  f"your prompt has {prompt_tokens} tokens.")
        if max_new_tokens is not None and max_new_tokens > room:
            raise GenerationError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                  f"you requested {prompt_tokens + max_new_tokens} tokens ({prompt_tokens} in the "
                                  f"messages, {max_new_tokens} in the completion).")
        return room if max_new_tokens is None else max_new_tokens

    def submit(self, inputs: dict, cfg: GenerationConfig, max_new_tokens: int | None = None, listener=None,
               think_ids: dict | None = None) -> Request:
        """Queue one prompt (batch 1: the processor's output). max_new_tokens None: up to the row's context.
        Raises GenerationError (does not fit, bad settings) or QueueFull, before anything is queued."""
        ids = _np(inputs["input_ids"], np.int64).reshape(-1)
        mask = _np(inputs.get("attention_mask"), np.int64)
        prompt = ids if mask is None else ids[mask.reshape(-1) > 0]
        new = self.check_prompt(len(ids), max_new_tokens)
        force = thinking_force(cfg, think_ids if think_ids is not None else self.model.think_ids)
        req = Request(inputs, Sequence(prompt, cfg, new, force, listener=None), len(prompt))

        def tell(kind, value):
            if kind == "token" and req.first_token_s is None:
                req.first_token_s = time.perf_counter() - req.submitted
            if listener is not None:
                listener(kind, value)
        req.seq.listener = tell
        if self.error is not None:
            raise RuntimeError(f"the engine stopped: {self.error}")
        try:
            self.waiting.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"all {self.max_num_seqs} rows are busy and {self.waiting.maxsize} requests wait; "
                            f"try again later") from None
        return req

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="glm4v-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def busy_rows(self) -> int:
        return sum(s is not None for s in self.batch.seqs) + (self.solo is not None and self.solo.active())

    def _solo_busy(self) -> bool:
        return self.solo is not None and self.solo.active()

    # ------------------------------------------------------------------ the engine thread
    def _admit(self, block: bool):
        """Move waiting requests into free rows; block briefly for one when nothing runs."""
        while len(self.batch.free_rows()) > self._solo_busy():   # the lone request needs a big row once joined
            try:
                req = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if req.seq.cancelled:
                req.seq.finish("cancelled")
                continue
            row = self.batch.best_row(req.inputs)
            if (self.solo is not None and not self._solo_busy() and not self.batch.active() and self.waiting.empty()
                    and self.solo.shared(req.inputs, 0) >= self.batch.shared(req.inputs, row)):
                where = (self.solo, 0)
            else:
                if self._solo_busy():   # the lone request moves to a free row this request does not want
                    self.solo.move(0, self.batch, next(r for r in self.batch.free_rows() if r != row))
                    self.moves += 1
                where = (self.batch, row)
            try:
                where[0].admit(where[1], req.inputs, req.seq)
                req.reused_tokens = where[0].last_reused
            except Exception as e:   # a bad prompt fails alone; the engine and the other rows go on
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                req.seq.finish_reason = "error"
                req.seq._tell("error", msg)

    def _step(self):
        if self.solo is not None and not self._solo_busy() and self.waiting.empty():
            busy = [r for r, s in enumerate(self.batch.seqs) if s is not None]
            if len(busy) == 1:   # alone again: continue on the one-row graph
                self.batch.move(busy[0], self.solo, 0)
                self.moves += 1
        for b in (self.solo, self.batch):
            if b is not None and b.active():
                b.step()
                self.steps += 1

    def _loop(self):
        try:
            while not self._stop.is_set():
                self._admit(block=not (self.batch.active() or self._solo_busy()))
                self._step()
        except BaseException as e:   # nothing should reach here; tell everyone waiting rather than hang them
            self.error = f"{type(e).__name__}: {e}"
            for seq in self.batch.seqs + (self.solo.seqs if self.solo is not None else []):
                if seq is not None and seq.finish_reason is None:
                    seq.finish_reason = "error"
                    seq._tell("error", self.error)
            raise
        finally:
            while True:   # stopped: nobody will serve what still waits
                try:
                    req = self.waiting.get_nowait()
                except queue.Empty:
                    break
                req.seq.finish("cancelled")
