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

Adapters (multi_lora): every rank holds its slices of the same adapters, each in the same slot. A slot write (rank
0's engine choosing a slot for a request: Bank.slot_for) is sent before rank 0 makes it, naming the slot and the
adapter, and every rank writes its own slices there. A runtime load (/v1/load_lora_adapter, once rank 0 has read the
folder) is one engine call: rank 0 sends the adapter's name and folder, every other rank reads its slices from the
folder, and all-gather brings every rank's outcome back to every rank: where one failed (the folder gone, unreadable)
no rank keeps the adapter and rank 0 answers that rank's error. An unload is sent too; each rank keeps its slices
while rank 0 still holds the adapter (requests that hold it finish with it), then rank 0 tells them to forget it.

Same tokens on every rank: a sampled request without a seed gets one drawn on rank 0 and sent with its settings.
A disconnect: rank 0 defers the cancel to its next step and names the cancelled rows in that step's message, so
every rank frees the same rows at the same step.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time
import weakref
from concurrent.futures import Future

import numpy as np

from glm4v_ms import parallel
from glm4v_ms.engine import Cancelled, Engine
from glm4v_ms.multi_lora import AdapterNotFound, LoraModulesError
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

    def _all(self, arr: np.ndarray) -> np.ndarray:
        from mindspore import Tensor, ops
        return ops.AllGather()(Tensor(arr)).asnumpy()   # every rank's part, in rank order

    def _gather(self, arr: np.ndarray) -> np.ndarray:
        return self._all(arr)[:len(arr)]   # rank 0's part

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

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (each rank calls it at the same point)."""
        self.last = time.monotonic()
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        sizes = self._all(np.array([len(data)], np.int32))
        words = np.zeros((int(sizes.max()) + 3) // 4, np.int32)
        words.view(np.uint8)[:len(data)] = np.frombuffer(data, np.uint8)
        parts = self._all(words).reshape(len(sizes), -1)
        return [pickle.loads(w.view(np.uint8)[:n].tobytes()) for w, n in zip(parts, sizes.tolist())]


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
        self.calls = queue.Queue()   # (function, Future): adapter loads and unloads, run on the engine thread
        self.dropped = []            # uids of unloaded adapters rank 0 no longer holds (the others may forget them)

    def _write_slot(self, slot: int, ad):
        self.chan.send(("lora_write", slot, ad.uid, ad.name))
        super()._write_slot(slot, ad)

    def _call(self, fn):
        """Run fn on the engine thread between two steps (the thread that talks to the other ranks); its result or
        its exception. RuntimeError when the engine stops first."""
        fut = Future()
        self.calls.put((fn, fut))
        while True:
            try:
                return fut.result(timeout=1.0)
            except TimeoutError:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the engine stopped") from None

    def adapter_loaded(self, ad):
        def load():
            self.chan.send(("lora_load", ad.uid, ad.name, ad.path))
            failed = [(r, e) for r, e in enumerate(self.chan.gather(None)) if e is not None]
            if failed:   # every rank saw the same outcomes: none keeps it
                r, (status, msg) = failed[0]
                raise (AdapterNotFound if status == 404 else LoraModulesError)(f"{msg} (on rank {r})")
        self._call(load)

    def adapter_unloaded(self, ad):
        uid = ad.uid
        weakref.finalize(ad, self.dropped.append, uid)   # the last request holding it has gone
        self._call(lambda: self.chan.send(("lora_unload", uid)))

    def _run_calls(self):
        while True:
            try:
                fn, fut = self.calls.get_nowait()
            except queue.Empty:
                break
            try:
                fut.set_result(fn())
            except Exception as e:
                fut.set_exception(e)
        if self.dropped:
            uids = []
            while self.dropped:
                uids.append(self.dropped.pop())
            self.chan.send(("lora_forget", uids))

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
        self._run_calls()
        super()._step()
        if self.chan.sent == sent and time.monotonic() - self.chan.last > 2.0:
            # idle: a heartbeat, as a rank waiting in a CPU collective gives up after 30 s
            self.chan.send(IDLE)

    def _loop(self):
        try:
            super()._loop()
        finally:   # stopped or failed: the other ranks leave too (from this thread, the one that talks to them)
            self.chan.send(STOP)
            while not self.calls.empty():
                self.calls.get_nowait()[1].set_exception(RuntimeError("the engine stopped"))


def follow(engine: Engine) -> int:
    """A rank other than 0: replay rank 0's calls on this rank's caches until it says stop."""
    chan = Channel(engine.model.layout)
    batches = dict(enumerate(engine.groups))
    engine.plan_compiles()   # rank 0's first calls are the same warm-ups
    bank = getattr(engine.model, "adapter_bank", None)
    # this rank's slices of every adapter rank 0 holds, by rank 0's uid (--lora-modules: read in the same order on
    # every rank, so their uids agree; runtime loads take rank 0's)
    held = {} if bank is None else {ad.uid: ad for ad in bank.adapters.values()}

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
            # the row's adapter and its slot (multi_lora): rank 0's slot writes came first ("lora_write")
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
        elif op == "lora_write":
            _, slot, uid, name = msg
            ad = held.get(uid)
            if ad is None or ad.name != name:
                raise RuntimeError(f"rank 0 writes adapter {name!r} (uid {uid}) into slot {slot}: this rank does not "
                                   f"hold it")
            bank.write(slot, ad)
        elif op == "lora_load":
            _, uid, name, path = msg
            try:   # this rank's slices; the outcome goes to every rank, which all keep it or all drop it
                ad, err = bank.read(name, path), None
                ad.uid = uid
            except AdapterNotFound as e:
                ad, err = None, (404, str(e))
            except Exception as e:   # LoraModulesError, or anything unforeseen: refused on every rank alike
                ad, err = None, (400, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            if all(e is None for e in chan.gather(err)):
                held[uid] = bank.adapters[name] = ad
        elif op == "lora_unload":
            ad = held[msg[1]]
            ad.unloaded = True
            if bank.adapters.get(ad.name) is ad:
                del bank.adapters[ad.name]
        elif op == "lora_forget":   # rank 0 no longer holds them: neither will this rank once its slots move on
            for uid in msg[1]:
                held.pop(uid, None)
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
