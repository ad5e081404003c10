import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("GLM4V_MS_DEVICE", "cpu")
os.environ.setdefault("GLOG_v", "3")   # MindSpore: errors only
# generate.py keeps compiled graphs in ~/.cache by default: tests do not (test_compile_cache.py opts in)
os.environ.setdefault("GLM4V_MS_COMPILE_CACHE", "off")


def pytest_sessionstart(session):
    """Pick MindSpore's device (and its thread count) before any test runs an op."""
    from glm4v_ms.device import select_device
    select_device()


def pytest_sessionfinish(session, exitstatus):
    """In CI every test must run: the parity tests compare against transformers, which CI installs, so a skip
    there means a missing reference, and that is a failure."""
    if os.environ.get("CI"):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
        if skipped:
            reporter.write_line(f"CI: {skipped} test(s) skipped; every test must run in CI", red=True)
            session.exitstatus = 1
