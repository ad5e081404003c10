"""The server under msrun (tensor parallel): rank 0 serves HTTP, every other rank replays its engine's decisions.

Each rank holds a slice of the model, so every decode step and every prefill must run on all ranks at once, in the
same order, with the same inputs (their collectives meet inside them). Only rank 0 sees requests. Rather than
re-deciding on each rank (the queue, timing and disconnects differ), rank 0's engine tells the others what it does
to its caches, just before it does it: the calls it makes on its Batch objects, one per row group (compile a group's
decode graph, admit a prompt into a row, move rows between groups, one decode step) and its shutdown. A prefill
runs in pieces with decode steps between them (the engine's chunked prefill): after each piece rank 0 sends the
steps it takes, then "resume" (or "resume, stop": the request was cancelled), which the other ranks' prefills wait
for at the same point. Wrapping those calls, not the engine's scheduling, keeps this
independent of how the engine picks rows.

Messages go over all-gather (see Channel): a length (one int32), then the pickled message padded to whole int32
words. While nothing happens rank 0 sends a heartbeat every 2 s (a CPU collective gives up after 30 s). Pickle is safe here: both ends are this program's
ranks of one launch.

Same tokens on every rank: a sampled request without a seed gets one drawn on rank 0 and sent with its settings.
A disconnect: rank 0 defers the cancel to its next step and names the cancelled rows in that step's message, so
every rank frees the same rows at the same step.
"""
from __future__ import annotations

import pickle
import threading
import time

import numpy as np

from glm4v_ms import parallel
from glm4v_ms.engine import Cancelled, Engine
from glm4v_ms.batch import Sequence
from glm4v_ms.prompt import Prompt

STOP, IDLE = ("stop",), ("idle",)


class Channel:
    """Rank 0's messages to every rank (one Python object per send/recv pair).

    Carried by all-gather, not broadcast: a CPU broadcast's root does not wait for the others, and two broadcasts
    in a row were seen to arrive out of order (the length taken for the payload). All-gather is a ring that every
    rank takes part in, so messages stay in order; the other ranks contribute zeros and keep rank 0's part."""

    def __init__(self, lay: parallel.Layout):
        self.lay, self.sent, self.last = lay, 0, time.monotonic()

    def _gather(self, arr: np.ndarray) -> np.ndarray:
        from mindspore import Tensor, ops
        return ops.AllGather()(Tensor(arr)).asnumpy()[:len(arr)]   # rank 0's part

    def send(self, msg):
        self.sent, self.last = self.sent + 1, time.monotonic()
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self._gather(np.array([len(data)], np.int32))
        words = np.zeros((len(data) + 3) // 4, np.int32)
        words.view(np.uint8)[:len(data)] = np.frombuffer(data, np.uint8)
        self._gather(words)

    def recv(self):
        n = int(self._gather(np.zeros(1, np.int32))[0])
        words = self._gather(np.zeros((n + 3) // 4, np.int32))
        return pickle.loads(words.view(np.uint8)[:n].tobytes())


class _Told:
    """One of rank 0's Batch objects: every call that touches the model is first sent to the other ranks."""

    def __init__(self, batch, name: str, chan: Channel, cancels: set, lock):
        # cancels: the Sequences whose client went away (both caches' set: a row may move before its step)
        self._batch, self._name, self._chan, self._cancels, self._lock = batch, name, chan, cancels, lock

    def __getattr__(self, attr):       # everything read-only (rows, prefixes, seqs) is the real batch's
        return getattr(self._batch, attr)

    def admit(self, row: int, p: Prompt, seq: Sequence, origin: tuple | None = None, between=None):
        cfg = seq.cfg
        if cfg.do_sample and cfg.seed is None:   # one seed for every rank, or their tokens diverge
            cfg = cfg.updated(seed=int(np.random.SeedSequence().entropy % 2 ** 31))
            seq.cfg, seq.rng = cfg, np.random.default_rng(cfg.seed)

        def cancel():                  # from the HTTP side: wait for the step that tells every rank
            with self._lock:
                self._cancels.add(seq)
        seq.cancel = cancel
        if seq.cancelled:              # cancelled before the line above: the same path
            seq.cancelled = False
            cancel()
        prompt = seq.history[0, :seq.n_prompt]
        where = None if origin is None else (origin[0]._name, origin[1])   # prefix reuse from another row
        # the record is host arrays (NumPy): it pickles as it is
        self._chan.send(("admit", self._name, row, p, prompt, cfg, seq.max_new, seq.force, where, seq.adapter,
                         seq.slot))
        return self._batch.admit(row, p, seq, None if origin is None else (origin[0]._batch, origin[1]),
                                 between)

    def move(self, rows, other, to):
        self._chan.send(("move", self._name, rows, other._name, to))
        return self._batch.move(rows, other._batch, to)

    def warmup(self):
        self._chan.send(("warmup", self._name))
        return self._batch.warmup()

    def step(self):
        rows = []
        with self._lock:
            for r, seq in enumerate(self._batch.seqs):
                if seq is not None and seq in self._cancels:
                    self._cancels.discard(seq)
                    seq.cancelled = True
                    rows.append(r)
            self._cancels -= {s for s in self._cancels if s.finish_reason is not None}   # ended meanwhile
        self._chan.send(("step", self._name, rows))
        return self._batch.step()


class LeaderEngine(Engine):
    """Rank 0's engine under msrun: the Engine, its batches wrapped so that the other ranks follow every call."""

    def __init__(self, model, *args, **kw):
        super().__init__(model, *args, **kw)
        self.chan = Channel(model.layout)
        self.cancels, self.lock = set(), threading.Lock()   # one set for all row groups: a row may move before its step
        self.groups = [_Told(g, i, self.chan, self.cancels, self.lock) for i, g in enumerate(self.groups)]

    def _between(self, seq):
        with self.lock:   # a request cancelled while it is prefilled: every rank stops its prefill at this point
            if seq in self.cancels:
                self.cancels.discard(seq)
                seq.cancelled = True
        super()._between(seq)

    def _resume(self, stop: bool):
        self.chan.send(("resume", stop))

    def _step(self):
        sent = self.chan.sent
        super()._step()
        if self.chan.sent == sent and time.monotonic() - self.chan.last > 2.0:
            # idle: a heartbeat, as a rank waiting in a CPU collective gives up after 30 s
            self.chan.send(IDLE)

    def _loop(self):
        try:
            super()._loop()
        finally:   # stopped or failed: the other ranks leave too (from this thread, the one that talks to them)
            self.chan.send(STOP)


def follow(engine: Engine) -> int:
    """A rank other than 0: replay rank 0's calls on this rank's caches until it says stop."""
    chan = Channel(engine.model.layout)
    batches = dict(enumerate(engine.groups))
    engine.plan_compiles()   # rank 0's first calls are the same warm-ups

    def between():   # between two pieces of a prefill: rank 0's steps, until it says resume (or stop)
        while True:
            msg = chan.recv()
            if msg[0] == "resume":
                if msg[1]:
                    raise Cancelled()
                return
            if apply(msg) is not None:
                raise _Stopped()   # not an Exception: the prefill's error handling must not swallow it

    def apply(msg):
        """Replay one call; returns the exit code on stop (None otherwise)."""
        op = msg[0]
        if op == "stop":
            return 0
        if op == "idle":
            return None
        if op == "admit":
            _, name, row, p, prompt, cfg, max_new, force, where, adapter, slot = msg
            origin = None if where is None else (batches[where[0]], where[1])
            seq = Sequence(prompt, cfg, max_new, force)
            # the row's adapter and its slot (multi_lora): every rank holds its slices of the same adapters in the
            # same slots (all of them, from the start: the server refuses slot swaps and runtime loads under msrun)
            seq.adapter, seq.slot = adapter, slot
            try:
                batches[name].admit(row, p, seq, origin, between)
            except Exception:   # a bad prompt (or a cancel) ends on rank 0 too, at the same point; the row stays free
                pass
        elif op == "move":
            _, name, row, dst, to = msg
            batches[name].move(row, batches[dst], to)
        elif op == "warmup":
            batches[msg[1]].warmup()
        elif op == "step":
            _, name, rows = msg
            b = batches[name]
            for r in rows:
                b.seqs[r].cancel()
            b.step()
        else:
            raise RuntimeError(f"unknown message from rank 0: {op!r}")
        return None

    while True:
        try:
            code = apply(chan.recv())
        except _Stopped:
            return 0
        if code is not None:
            return code


class _Stopped(BaseException):
    """Rank 0 stopped while this rank waited in the middle of a prefill."""
