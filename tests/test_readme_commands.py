"""The README's compiling commands as a user runs them: the command line read from README.md, started in a
subprocess from the checkout with the compile cache on (a fresh folder), used, stopped, started again; the
second start loads its graphs from the cache (it writes nothing there, and answers the same).

MindSpore's cache once failed every compile under `python -m` (it opened <cwd>/-m, issue 19), which no test saw:
they built the server in-process or started a script."""
import base64
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request

from glm4v_ms import compile_cache
from serving import sigterm, wait_healthy
from test_compile_cache import snapshot
from test_parallel import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
    README = fh.read()


def blocks(lang=""):
    """The README's fenced code blocks of one language ("": plain blocks: the shell commands)."""
    out, cur, keep = [], None, False
    for line in README.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur, keep = [], line[3:].strip() == lang
            else:
                if keep:
                    out.append("\n".join(cur) + "\n")
                cur = None
        elif cur is not None:
            cur.append(line)
    return out


def readme_command(start: str) -> list:
    """The README's command beginning with `start`, as argv: its indented or `\\` continuation lines joined,
    the optional `[...]` parts dropped."""
    for block in blocks():
        lines = block.splitlines()
        for i, line in enumerate(lines):
            at = line.find(start)
            if at < 0:
                continue
            cmd = [line[at:]]
            for nxt in lines[i + 1:]:
                if not (nxt.startswith(" ") or cmd[-1].rstrip().endswith("\\")):
                    break
                cmd.append(nxt)
            text = " ".join(c.rstrip().rstrip("\\") for c in cmd)
            return shlex.split(re.sub(r"\[[^\]]*\]", " ", text.split("#")[0]))
    raise AssertionError(f"README.md documents no command starting with {start!r}")


def child_env(cache):
    return dict(os.environ, GLM4V_MS_DEVICE="cpu", GLM4V_MS_COMPILE_CACHE=str(cache))


def graphs(cache):
    files = snapshot(cache)
    assert not any(compile_cache.PARTIAL in f for f in files), files   # every folder published
    return files, sum(f.endswith(".mindir") for f in files)


def test_server_command_as_the_readme_writes_it(tmp_path):
    """`python -m glm4v_ms.serve` with the README's flags (--model demo-tiny, as the README offers), the README's
    curl request (an image as a data: URL; greedy and 16 tokens here, so the two starts can be compared), SIGTERM;
    then again: the row groups' decode graphs come from the cache, and the answer is the same."""
    argv = readme_command("python -m glm4v_ms.serve")
    assert argv[:3] == ["python", "-m", "glm4v_ms.serve"], argv
    port = free_port()
    argv = [sys.executable] + argv[1:]
    argv[argv.index("--model") + 1] = "demo-tiny"
    argv[argv.index("--port") + 1] = str(port)
    name = argv[argv.index("--served-model-name") + 1]

    curl = next(b for b in blocks() if b.startswith("curl "))
    body = curl.split("-d '", 1)[1].rsplit("'", 1)[0]
    with open(os.path.join(ROOT, "examples", "scene.png"), "rb") as fh:
        body = json.loads(body.replace("'\"$(base64 -w0 cat.png)\"'", base64.b64encode(fh.read()).decode()))
    assert body["model"] == name, (body["model"], name)   # the README's request names the README's server
    body.update(max_tokens=16, temperature=0)

    url = f"http://127.0.0.1:{port}"
    cache = tmp_path / "cache"
    answers = []
    for start in range(2):
        p = subprocess.Popen(argv, cwd=ROOT, env=child_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            wait_healthy(url, p)
            req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                reply = json.loads(r.read())
            assert reply["usage"]["completion_tokens"] > 0, reply
            answers.append(reply["choices"][0]["message"])
        finally:
            err = sigterm(p)
        assert "Traceback" not in err and "[WARNING]" not in err, err[-3000:]   # MindSpore's log: errors only
        assert "SIGTERM: stopping" in err, err[-3000:]
        files, n = graphs(cache)
        if start == 0:
            stored = files
            assert n == 3, files   # the decode graphs of the row groups of 1, 2 and 4 rows
    assert files == stored     # the second start compiled nothing: it loaded the three graphs
    assert answers[1] == answers[0]


def test_python_example_and_generate_py_as_the_readme_writes_them(tmp_path):
    """The README's Python example (a forward, then generate) with GLM4V_MS_COMPILE_CACHE set, as the README
    says: pasted to `python -` first, then saved as a script; the script loads the graphs stdin's run stored (the
    entry point is not in the key). Then the README's first command, generate.py on the demo model, twice."""
    example = blocks("python")[0]
    assert "model.generate(" in example and "model(**inputs)" in example, example
    script = tmp_path / "example.py"
    script.write_text(example)
    generate = readme_command("python generate.py --model_name demo-tiny")
    assert generate[:2] == ["python", "generate.py"], generate
    for what, runs in (("example", [[sys.executable, "-"], [sys.executable, str(script)]]),
                       ("generate", [[sys.executable] + generate[1:]] * 2)):
        cache = tmp_path / what
        out = []
        for argv in runs:
            # PYTHONPATH: the script lives outside the checkout, the package installed (`pip install -e .`)
            p = subprocess.run(argv, cwd=ROOT, env=dict(child_env(cache), PYTHONPATH=ROOT),
                               input=example if argv[-1] == "-" else None,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
            assert "compile cache off" not in p.stderr, p.stderr[-3000:]
            out.append(p.stdout)
            if len(out) == 1:
                stored, n = graphs(cache)
                assert n == 2, stored   # the prompt graph and the decode graph of the first generate
        assert graphs(cache)[0] == stored, what   # the second run compiled nothing
        assert out[1] == out[0] and out[0].strip(), out
