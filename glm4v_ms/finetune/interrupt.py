"""Ctrl-C during training: the first stops after the current step, with a checkpoint; the second quits at once.

MindSpore replaces Python's SIGINT handler whenever it compiles a graph (its own ends the process with SIGTERM), so
no Python handler can be relied on (generate_cli.exit_on_interrupt meets the same). `watch()` blocks SIGINT in the
calling thread before MindSpore starts any thread (every thread inherits the mask) and takes it in a watcher
thread with sigwait. The fine-tuning command calls it first, before importing MindSpore; this module imports none.
"""
from __future__ import annotations

import os
import signal
import threading

_STOP = threading.Event()
_TRAINING = threading.Event()


def watch() -> bool:
    """Install the watcher (main thread only); False where the platform has no pthread_sigmask."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def run():
        signal.sigwait({signal.SIGINT})
        if _TRAINING.is_set():
            _STOP.set()
            os.write(2, b"\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again quits now)\n")
            signal.sigwait({signal.SIGINT})
        os.write(2, b"\ninterrupted\n")
        os._exit(130)   # no interpreter teardown: MindSpore's threads may be mid-kernel
    threading.Thread(target=run, name="sigint", daemon=True).start()
    return True


def request_stop():
    """What the first Ctrl-C does (also for tests and embedding programs)."""
    _STOP.set()


def requested() -> bool:
    return _STOP.is_set()


def training(on: bool):
    """While on, a Ctrl-C asks the loop to stop (and save) instead of quitting."""
    (_TRAINING.set if on else _TRAINING.clear)()
    if not on:
        _STOP.clear()
