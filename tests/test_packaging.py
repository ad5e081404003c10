"""The package as a user installs it: `pip install .` and `pip install -e .` into a fresh virtualenv, then
`import glm4v_ms` from another folder, the console scripts, and the README's Python example as written.

The fresh virtualenv sees this environment's site-packages through a .pth file (so mindspore and the rest count as
installed and nothing is downloaded), and pip runs with --no-index --no-build-isolation: setuptools comes from this
environment too. What the install must bring is then exactly the package itself.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("glm4v-ms-generate", "glm4v-ms-convert", "glm4v-ms-parity", "glm4v-ms-serve",
           "glm4v-ms-finetune")
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "out", ".whl",
                              ".gl", "rank_*", "kernel_meta")


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _requirement_lines(name):
    lines = []
    for line in open(os.path.join(ROOT, name), encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            lines.append(line.replace(" ", ""))
    return lines


def test_pyproject_agrees_with_requirements_files():
    project = _pyproject()["project"]
    assert [d.replace(" ", "") for d in project["dependencies"]] == _requirement_lines("requirements.txt")
    assert set(_requirement_lines("requirements-dev.txt")) == set(project["optional-dependencies"]["dev"])
    dev = set(project["optional-dependencies"]["dev"])
    assert set(project["optional-dependencies"]["reference"]) <= dev
    assert set(project["scripts"]) == set(SCRIPTS)
    assert not any("torch" in d or "transformers" in d for d in project["dependencies"])  # reference only


def _fresh_venv(path):
    """A virtualenv without pip whose sys.path ends with this environment's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = os.path.join(path, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "_glm4v_ms_test_parent.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    return python


def _pip_install(python, *args):
    p = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index",
                        "--no-build-isolation", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


def _run(cmd, cwd, env=None, timeout=300):
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONPATH", None)  # the installed package must be found on its own
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree (links kept, as a clone has them), so building never writes into the repo."""
    dst = tmp_path_factory.mktemp("checkout") / "glm4v-ms"
    shutil.copytree(ROOT, dst, symlinks=True, ignore=SKIP)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory, checkout):
    venv = tmp_path_factory.mktemp("venv")
    python = _fresh_venv(venv)
    _pip_install(python, str(checkout))
    return venv, python


def test_install_imports_from_another_folder(installed, tmp_path):
    venv, python = installed
    p = _run([python, "-c", "import glm4v_ms, glm4v_ms.processing, glm4v_ms.generate_cli; "
              "print(glm4v_ms.__file__); print(glm4v_ms.__version__); print(glm4v_ms.generate_cli.__file__)"],
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    package, version, generate_cli = p.stdout.split()
    assert package.startswith(str(venv)) and generate_cli.startswith(str(venv))   # the installed copy, not ROOT
    assert not os.path.islink(generate_cli)                                        # the wheel holds the file itself
    with open(generate_cli, encoding="utf-8") as a, open(os.path.join(ROOT, "glm4v_ms", "generate_cli.py"),
                                                         encoding="utf-8") as b:
        assert a.read() == b.read()
    assert version == _pyproject_version()
    # every file of the package reaches the install (data files such as the server's page included)
    site = os.path.dirname(os.path.dirname(package))
    for folder, dirs, files in os.walk(os.path.join(ROOT, "glm4v_ms")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), ROOT)
            if not name.endswith(".pyc"):
                assert os.path.isfile(os.path.join(site, rel)), f"{rel} is not installed"
    meta = _run([python, "-c", "import importlib.metadata as m; print('\\n'.join(m.requires('glm4v-ms')))"],
                cwd=tmp_path)
    requires = meta.stdout.splitlines()
    assert any(r.startswith("mindspore") for r in requires)
    assert any(r.startswith("fastapi") and 'extra == "serve"' in r for r in requires)
    assert any(r.startswith("torch==2.13.0") and 'extra == "reference"' in r for r in requires)


def _pyproject_version():
    text = open(os.path.join(ROOT, "glm4v_ms", "__init__.py"), encoding="utf-8").read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


@pytest.mark.parametrize("script, usage", [("glm4v-ms-generate", "--model_name"), ("glm4v-ms-convert", "--src"),
                                           ("glm4v-ms-parity", "dump"), ("glm4v-ms-finetune", "config.yaml")])
def test_console_scripts_help(installed, tmp_path, script, usage):
    venv, _ = installed
    p = _run([os.path.join(venv, "bin", script), "--help"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage:") and usage in p.stdout


def test_generate_script_reports_bad_input_in_one_line(installed, tmp_path):
    venv, _ = installed
    p = _run([os.path.join(venv, "bin", "glm4v-ms-generate"), "--model_name", str(tmp_path / "nope"),
              "--prompt", "hi"], cwd=tmp_path)
    assert p.returncode != 0
    assert p.stderr.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_cache"))


def test_readme_install_command_runs(installed, checkout, demo_cache):
    """The README's `glm4v-ms-generate` line, as the installed command, from the checkout (its image path)."""
    venv, _ = installed
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    line = re.search(r"^pip install \. && (glm4v-ms-generate .*)$", readme, re.M).group(1)
    argv = shlex.split(line)
    env = dict(os.environ, GLM4V_MS_CACHE=demo_cache, GLM4V_MS_DEVICE="cpu")
    p = _run([os.path.join(venv, "bin", argv[0]), *argv[1:], "--max_new_tokens", "4"], cwd=checkout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith("prompt tokens: ")


def test_readme_python_example_runs_as_written(installed, checkout, tmp_path, demo_cache):
    """The README's first Python block, run from the checkout (its image path is relative to it) with the
    installed package."""
    _, python = installed
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    script = tmp_path / "example.py"   # outside the checkout: the checkout's glm4v_ms is not on sys.path
    script.write_text(example + "\nimport glm4v_ms; print(glm4v_ms.__file__)\n", encoding="utf-8")
    env = dict(os.environ, GLM4V_MS_CACHE=demo_cache, GLM4V_MS_DEVICE="cpu")
    p = _run([python, str(script)], cwd=checkout, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert not lines[-1].startswith(str(checkout))
    assert re.fullmatch(r"\(1, \d+, 512\) \(1, \d+\)", lines[-2]), lines


def test_editable_install(tmp_path, checkout):
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-e", str(checkout))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = _run([python, "-c", "import glm4v_ms; print(glm4v_ms.__file__)"], cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(checkout / "glm4v_ms" / "__init__.py")   # the checkout itself: edits take effect
    p = _run([str(tmp_path / "venv" / "bin" / "glm4v-ms-generate"), "--help"], cwd=elsewhere)
    assert p.returncode == 0 and "--model_name" in p.stdout, p.stderr
