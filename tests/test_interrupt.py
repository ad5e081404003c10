"""Ctrl-C anywhere in generate.py (import, load, prefill, decode, waiting for a chat prompt): `interrupted` on
stderr, exit status 130, no traceback and no MindSpore error flood."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTICES = ("[demo-tiny:", "[memory:")   # the lines generate.py prints before it generates


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, GLM4V_MS_CACHE=str(tmp_path_factory.mktemp("cache")), GLM4V_MS_DEVICE="cpu",
             PYTHONPATH=ROOT)
    # build the demo checkpoint once, outside the runs that get interrupted
    subprocess.run([sys.executable, "-c", "from glm4v_ms import demo; demo.cached('demo-tiny')"], env=e, check=True,
                   cwd=ROOT, timeout=300)
    return e


class Run:
    """generate.py in a subprocess, its stdout and stderr collected as they come."""

    def __init__(self, env, *args):
        self.p = subprocess.Popen([sys.executable, "generate.py", "--model_name", "demo-tiny", *args], cwd=ROOT,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self.threads = [threading.Thread(target=self._pump, args=(s, b), daemon=True)
                        for s, b in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for t in self.threads:
            t.start()

    @staticmethod
    def _pump(stream, buf):
        for chunk in iter(lambda: stream.read1(4096), b""):
            buf.extend(chunk)

    def wait_for(self, cond, timeout=120):
        end = time.monotonic() + timeout
        while not cond():
            assert self.p.poll() is None, f"exited early: {self.p.returncode} {bytes(self.err)!r}"
            assert time.monotonic() < end, f"timed out waiting: {bytes(self.err)!r}"
            time.sleep(0.02)

    def interrupt(self):
        self.p.send_signal(signal.SIGINT)
        rc = self.p.wait(timeout=60)
        for t in self.threads:
            t.join(10)
        return rc, bytes(self.err).decode(errors="replace")


def check(rc, err):
    assert rc == 130, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1] == "interrupted", err
    assert all(ln.startswith(NOTICES) for ln in lines[:-1]), err   # nothing else: no traceback, no error flood


def test_during_import(env):
    r = Run(env, "--prompt", "hi")
    time.sleep(0.5)     # MindSpore's import takes seconds; the interrupt lands in it
    check(*r.interrupt())


def test_during_load(env):
    r = Run(env, "--prompt", "hi")
    r.wait_for(lambda: b"[demo-tiny:" in r.err)   # the model folder is resolved; the load follows
    check(*r.interrupt())


def test_during_generation(env):
    r = Run(env, "--prompt", "hi", "--max_new_tokens", "5000", "--greedy")
    r.wait_for(lambda: b"[memory:" in r.err)
    time.sleep(0.3)     # prefill (and the decode graph's compile)
    check(*r.interrupt())


def test_during_decode(env):
    r = Run(env, "--prompt", "hi", "--max_new_tokens", "5000", "--greedy")
    r.wait_for(lambda: len(r.out) > 20)           # tokens are streaming
    check(*r.interrupt())


def test_waiting_for_a_chat_prompt(env):
    r = Run(env, "--chat")
    r.wait_for(lambda: b"[memory:" in r.err)
    time.sleep(0.5)
    check(*r.interrupt())
