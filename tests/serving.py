"""A real server in a thread for the serving tests: uvicorn on a free localhost port, the openai client; and
waiting for a server started as a subprocess."""
import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai

from glm4v_ms import batch


class Running:
    def __init__(self, argv):
        import uvicorn
        from glm4v_ms.serve.__main__ import build, parse
        self.app, self.engine = build(parse(argv))
        self.state = self.app.state.server
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()

    def post(self, body, path="/v1/chat/completions", headers=None, raw=None):
        """(status, parsed JSON) of a raw POST: for what the openai client would refuse to send."""
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def script_sampler(monkeypatch, tokenizer, text):
    """Force the sampler to emit `text` token by token (the model, engine and detokenising stay real)."""
    script = tokenizer.encode(text, add_special_tokens=False)
    real = batch.sample   # Sequence.next_token's sampler
    monkeypatch.setattr(batch, "sample", lambda logits, history, step, cfg, rng: (
        np.array([script[step]]) if step < len(script) else real(logits, history, step, cfg, rng)))
    return script


def wait_healthy(url, proc, timeout=240, log=lambda: ""):
    """Poll `url`/health until a server started as the subprocess `proc` answers 200; fail at once when its
    engine reports that it stopped (a 500 with the error) or the process ends, else after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/health: {e.code} {e.read()[:2000]} {log()}") from None
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, f"no server: {log()}"
        time.sleep(0.5)


def sigterm(proc, timeout=60) -> str:
    """Stop a server started as the subprocess `proc` (text pipes) the way a user does: SIGTERM; its stderr.
    AssertionError (with the log's end) when it does not stop within `timeout` s."""
    import signal
    import subprocess
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGTERM did not stop the server: " + proc.communicate()[1][-3000:]) from None
