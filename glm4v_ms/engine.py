"""The serving engine: one thread owns the model and decodes every admitted request together (continuous batching).

Callers (the HTTP server, tests) only `submit` work and read what comes back through the listener they pass; the
listener runs on the engine thread, so it must only hand the event on (e.g. `loop.call_soon_threadsafe`).

Row groups: static KV caches of 1, 2, 4, ... rows up to `max_num_seqs` (`group_sizes`), each of `max_model_len`
slots per row (llama.cpp's per-slot context) and each with its own compiled (rows, 1) decode graph (vLLM likewise
captures its decode graph for a list of batch sizes and pads a live batch up to the nearest). All busy rows live in
one group: the smallest that holds them. A step decodes that group's rows (batch.Batch.step, the loop body
model.generate() runs), free rows decoding a dummy token, so a step costs about what the busy rows need (on CPU a
step of 8 rows costs 2.1-2.5x a step of one, of 2 rows about the same). A waiting request is prefilled into a free
row as soon as one exists while the other rows keep their state; when the busy rows and the newcomers outgrow the
group, the busy rows move to the bigger group first (a copy of their cache rows); when requests finish and nothing
waits, they move down to the smallest group that holds them. A finished or cancelled request frees its row at the
next step. One compiled decode graph per group, all compiled at start (`warmup`), whatever the traffic afterwards.

Prefix reuse (prefix_reuse=True, the server's default): a row that finishes remembers what its cache holds (in
whichever group it is); a new request starts from the free row, in any group, whose cache shares the longest prefix
of token ids with its prompt (images compared by their pixels), and only the rest of the prompt is prefilled (a
chat's next turn skips its history and images). A row's record moves with it between groups, and the row it left
keeps a copy. Rows without a record are overwritten first, then the oldest records.

Chunked prefill: a prompt is prefilled in pieces (the vision tower's blocks and their attention's query blocks,
then each 256-token chunk of a long prompt: model.run) and the busy rows take one decode step between two
pieces, so a long prompt (a 4K image: ~6000 tokens) slows the running streams rather than stalling them for its
whole prefill (vLLM's chunked prefill, with one
prompt piece per step as its budget). A request cancelled (or an engine stopped) mid-prefill stops at the next
piece. Requests still join one at a time, in order: a short prompt waits behind a long one's prefill.

Adapters (a multi_lora bank on the model): a request names the Adapter it decodes with; when it is taken from the
queue its adapter gets a slot (multi_lora.Bank.slot_for: the slot holding it, or an idle one rewritten); when every
slot holds another adapter with running rows it waits in `deferred`, keeping its place, while later requests for
the base or for adapters in slots go ahead (vLLM's scheduler with --max-loras).
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from . import compile_cache
from .batch import Batch, Sequence
from .generation_config import GenerationConfig, thinking_force
from .prompt import Prompt
from .shapes import decode_graph, fit


def group_sizes(max_num_seqs: int) -> list:
    """Rows of each cache group: the powers of two below max_num_seqs, then max_num_seqs itself, at most
    2 x max_num_seqs rows in all (for a size that is no power of two, the largest power below it is dropped
    where it would pass that: 6 -> 1, 2, 6)."""
    sizes = [1 << i for i in range(max_num_seqs.bit_length()) if 1 << i < max_num_seqs] + [max_num_seqs]
    while sum(sizes) > 2 * max_num_seqs:
        sizes.pop(-2)
    return sizes


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is full: try again later (HTTP 503)."""


class Cancelled(Exception):
    """Raised between two pieces of a prefill whose request was cancelled (or whose engine stops)."""


class Request:
    """A submitted prompt: cancel() from any thread stops it (waiting: never admitted; running: its row is freed
    at the engine's next step). The listener hears ("token", id), then ("done", finish_reason) or ("error", msg)."""

    def __init__(self, prompt: Prompt, seq: Sequence):
        self.prompt, self.seq, self.prompt_tokens = prompt, seq, int(prompt.mask.sum())
        self.adapter = None       # its multi_lora.Adapter (None: the base)
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
                 prefix_reuse: bool = False, row_groups: bool = True, chunked_prefill: bool = True):
        """row_groups False: only a one-row cache and one of max_num_seqs rows (max_num_seqs + 1 rows in all).
        chunked_prefill False: a prompt is prefilled whole while the busy rows wait."""
        ctx = model.config.text.max_position_embeddings
        self.model = model
        self.max_model_len = min(int(max_model_len or min(ctx, 8192)), ctx)
        if max_num_seqs < 1 or self.max_model_len < 64:
            raise ValueError("max_num_seqs must be >= 1 and max_model_len >= 64")
        self.max_num_seqs = max_num_seqs
        sizes = group_sizes(max_num_seqs) if row_groups else sorted({1, max_num_seqs})
        # every group remembers what its rows hold (prefix reuse), so a row keeps its record when it moves. Each
        # group's cache and compiled graph belong to it (Batch.empty), apart from the model's own decoders
        self.groups = [Batch.empty(model, n, self.max_model_len, prefix_reuse) for n in sizes]
        self.cur = 0              # the group holding the busy rows
        self.warm = 0             # groups whose decode graph is compiled
        self.waiting = queue.Queue(maxsize=max_queue)
        self.deferred = []        # taken from `waiting`, waiting for an adapter slot (engine thread only)
        self.slot_waits = 0       # times a request found no adapter slot and waited (for tests)
        self._stop = threading.Event()
        self._thread = None
        self.steps = 0            # decode steps run (for tests and /health)
        self.moves = 0            # rows handed from one group to another
        self.group_steps = dict.fromkeys(sizes, 0)   # decode steps run per group size
        self.chunked_prefill = chunked_prefill
        self.prefilling = None    # the request being prefilled (its pieces interleave with decode steps)
        self.steps_between = 0    # decode steps run between the pieces of a prefill (chunked prefill)
        self.error = None         # an unexpected failure that stopped the engine thread

    def kv_bytes(self) -> int:
        """Bytes of the groups' KV caches together (allocated on first use; all of them by warmup)."""
        return sum(int(np.prod(p.shape)) * p.itemsize for g in self.groups for p in (*g.st.dec.k, *g.st.dec.v))

    def plan(self) -> str:
        """The groups and what their caches cost, for the server's start line."""
        sizes = [len(g.seqs) for g in self.groups]
        size = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"  # noqa: E731
        return (f"rows {self.max_num_seqs} x {self.max_model_len} tokens; KV cache in groups of "
                f"{', '.join(map(str, sizes))} rows: {sum(sizes)} rows x {size(self.kv_bytes() / sum(sizes))} "
                f"= {size(self.kv_bytes())}")

    # ------------------------------------------------------------------ client side (any thread)
    def check_prompt(self, prompt_tokens: int, max_new_tokens: int | None) -> int:
        """The number of new tokens a prompt of this length may make in a row (shapes.fit: the prompt fills its
        bucket's slots, a max_new_tokens beyond the row is refused), or GenerationError."""
        return fit(prompt_tokens, self.max_model_len, max_new_tokens, strict=True, padded=True)

    def submit(self, inputs: dict, cfg: GenerationConfig, max_new_tokens: int | None = None, listener=None,
               think_ids: dict | None = None, adapter=None) -> Request:
        """Queue one prompt (batch 1: the processor's output). max_new_tokens None: up to the row's context.
        adapter: the multi_lora.Adapter its row decodes with (one of the model's bank's), None the base; the request
        holds it, so an unload after this does not disturb it.
        Raises GenerationError (does not fit, bad settings) or QueueFull, before anything is queued."""
        p = Prompt.of(self.model.config, inputs)
        new = self.check_prompt(p.shape[1], max_new_tokens)
        force = thinking_force(cfg, think_ids if think_ids is not None else self.model.think_ids)
        req = Request(p, Sequence(p.real(0), cfg, new, force, listener=None))
        if adapter is not None:
            bank = getattr(self.model, "adapter_bank", None)
            if bank is None or adapter.rank > bank.max_rank:
                raise ValueError(f"adapter {adapter.name}: not one this model's bank can hold")
            req.adapter, req.seq.adapter = adapter, adapter.uid

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
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="glm4v-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def busy_rows(self) -> int:
        """Rows decoding a request. A request's row is freed just after its last token tells the listener "done",
        so its client may have the answer first: counted here as free from that point on."""
        return sum(s is not None and s.finish_reason is None for g in self.groups for s in g.seqs)

    # ------------------------------------------------------------------ the engine thread
    def _fit(self, n: int) -> int:
        """The smallest group holding n rows."""
        return next(i for i, g in enumerate(self.groups) if len(g.seqs) >= n)

    @staticmethod
    def _spare(g: Batch, rows) -> list:
        """Free rows of `g` among `rows`, the cheapest to overwrite first: no record, then the oldest record."""
        return sorted(rows, key=lambda r: -1.0 if g.saved is None or g.saved[r] is None else g.saved[r][2])

    def _take(self, block: bool) -> list:
        """Waiting requests, as many as rows are free (the first one waited for briefly when `block`), each with
        its adapter's slot; a request whose adapter finds no slot (every slot holds another adapter with running
        rows) waits in `deferred`, keeping its place, while later ones may pass it (vLLM's scheduler)."""
        room = self.max_num_seqs - sum(s is not None for s in self.groups[self.cur].seqs)
        bank = getattr(self.model, "adapter_bank", None)
        busy = {s.slot for g in self.groups for s in g.seqs if s is not None}
        out, pending, self.deferred = [], self.deferred, []
        while len(out) < room:
            if pending:
                req = pending.pop(0)
            else:
                try:
                    req = self.waiting.get(timeout=0.05) if block else self.waiting.get_nowait()
                except queue.Empty:
                    break
                block = False
            if req.seq.cancelled:
                req.seq.finish("cancelled")
                continue
            if req.adapter is not None:
                slot = bank.slot_for(req.adapter, busy, self._write_slot)
                if slot is None:
                    self.deferred.append(req)
                    self.slot_waits += 1
                    continue
                req.seq.slot = slot
                busy.add(slot)
            out.append(req)
        self.deferred += pending
        return out

    def queued(self) -> int:
        """Requests waiting for a row or an adapter slot."""
        return self.waiting.qsize() + len(self.deferred)

    def _admit(self, block: bool):
        """Move waiting requests into free rows of the smallest group that holds them and the busy rows (the busy
        rows move there first); block briefly for one when nothing runs."""
        reqs = self._take(block)
        if not reqs:
            return
        cur = self.groups[self.cur]
        busy = [r for r, s in enumerate(cur.seqs) if s is not None]
        ti = max(self._fit(len(busy) + len(reqs)), self.cur)
        tgt = self.groups[ti]
        free = set(tgt.free_rows())
        # each request's origin: the free row, in any group, remembering the longest prefix of its prompt; one
        # in the target group is taken as the request's own row (and kept from the moved rows)
        plan = []
        for req in reqs:
            best = max(((g.shared(req.prompt, r, req.seq.adapter), gi, r) for gi, g in enumerate(self.groups) for r in g.free_rows()
                        if gi != ti or r in free), default=(0, None, None))
            row = None
            if best[0] > 0 and best[1] == ti:
                row = best[2]
                free.discard(row)
            plan.append([req, row, (self.groups[best[1]], best[2]) if best[0] > 0 else None])
        spare = self._spare(tgt, free)
        if ti != self.cur:
            tos, spare = spare[:len(busy)], spare[len(busy):]
            cur.move(busy, tgt, tos)
            self.moves += len(busy)
            self.cur = ti
        for p in plan:
            if p[1] is None:
                p[1] = spare.pop(0)
        for req, row, origin in plan:
            self.prefilling = req
            try:
                between = (lambda seq=req.seq: self._between(seq)) if self.chunked_prefill else None
                tgt.admit(row, req.prompt, req.seq, origin, between=between)
                req.reused_tokens = tgt.last_reused
            except Cancelled:
                req.seq.finish("cancelled")
            except Exception as e:   # a bad prompt fails alone; the engine and the other rows go on
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                req.seq.finish_reason = "error"
                req.seq._tell("error", msg)
            finally:
                self.prefilling = None

    def plan_compiles(self):
        """The warm-up's graphs, in order, for the persistent compile cache (when on: the server's default), so
        that the next start loads them. Prompt graphs compile as traffic comes, outside the plan: not kept."""
        compile_cache.plan(self.model, [compile_cache.signature(*decode_graph(len(g.seqs), self.max_model_len))
                                        for g in self.groups])

    def _between(self, seq: Sequence):
        """Between two pieces of a prefill: one decode step of the busy rows (the current group: the prefill's
        own row and its origin are free rows there, which a step leaves alone), or Cancelled."""
        stop = seq.cancelled or self._stop.is_set()
        if not stop:
            g = self.groups[self.cur]
            if g.active():
                self._decode(g)
                self.steps_between += 1
        self._resume(stop)
        if stop:
            raise Cancelled()

    def _write_slot(self, slot: int, ad):
        """Adapter `ad` into bank slot `slot` (its request's, chosen by slot_for): one rank writes it (LeaderEngine
        tells the other ranks first)."""
        self.model.adapter_bank.write(slot, ad)

    def adapter_loaded(self, ad):
        """Any thread: `ad` (read on this host by bank.read) is served from now on. Nothing to do in one process
        (a slot takes it when a request needs it); LeaderEngine has every other rank read its slices, or raises
        multi_lora.LoraModulesError where one cannot (then no rank holds it)."""

    def adapter_unloaded(self, ad):
        """Any thread: `ad` is no longer served (requests holding it finish with it). Nothing to do in one process;
        LeaderEngine tells the other ranks."""

    def _resume(self, stop: bool):
        """The prefill goes on (or stops): nothing to do on one rank (LeaderEngine tells the other ranks)."""

    def _decode(self, g: Batch):
        g.step()
        self.steps += 1
        self.group_steps[len(g.seqs)] += 1

    def _step(self):
        g = self.groups[self.cur]
        busy = [r for r, s in enumerate(g.seqs) if s is not None]
        fit = self._fit(len(busy))
        # fewer rows busy and nothing waits: continue in the smallest group holding them
        if fit < self.cur and self.waiting.empty() and not self.deferred:
            if busy:
                small = self.groups[fit]
                g.move(busy, small, self._spare(small, small.free_rows())[:len(busy)])
                self.moves += len(busy)
            self.cur, g = fit, self.groups[fit]
        if g.active():
            self._decode(g)

    def _loop(self):
        try:
            if self.warm == 0:
                self.plan_compiles()
            while self.warm < len(self.groups):   # compile every group's decode graph before serving
                self.groups[self.warm].warmup()
                self.warm += 1
            while not self._stop.is_set():
                self._admit(block=not self.groups[self.cur].active())
                self._step()
        except BaseException as e:   # nothing should reach here; tell everyone waiting rather than hang them
            self.error = f"{type(e).__name__}: {e}"
            for seq in (s for g in self.groups for s in g.seqs):
                if seq is not None and seq.finish_reason is None:
                    seq.finish_reason = "error"
                    seq._tell("error", self.error)
            raise
        finally:
            for req in self.deferred:
                req.seq.finish("cancelled")
            self.deferred = []
            while True:   # stopped: nobody will serve what still waits
                try:
                    req = self.waiting.get_nowait()
                except queue.Empty:
                    break
                req.seq.finish("cancelled")
