"""The bounded localhost load test (benchmarks/load_serve.py) against a server subprocess: 64 requests from 16
clients per round, a quarter of them disconnecting mid-stream; none lost, the server stays up and goes idle, and
its memory does not grow from round to round."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import load_serve  # noqa: E402


def test_load_rounds(tmp_path):
    proc, url = load_serve.start_server("demo-tiny", ["--max-num-seqs", "8", "--max-queue", "32", "--max-model-len", "512"],
                                        env={"GLM4V_MS_CACHE": str(tmp_path)})
    try:
        assert load_serve.warm_up(url) == ["ok", "ok"]
        rss, counts = [], []
        for _ in range(3):
            r = load_serve.round_(url, 64, 16)
            assert r["lost"] == [] and r["idle"], r
            assert sum(r["counts"].values()) == 64 and set(r["counts"]) <= {"ok", "disconnected", "error:503"}
            assert r["counts"].get("disconnected", 0) >= 1 and r["counts"].get("ok", 0) >= 16
            counts.append(r["counts"])
            rss.append(load_serve.rss_mb(proc.pid))
        assert load_serve.health(url)["status"] == "ok" and proc.poll() is None
        assert rss[2] - rss[1] < 32, rss   # MiB; warm-up (graphs, caches) is round 1
    finally:
        load_serve.stop_server(proc)
