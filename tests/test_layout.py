"""The package's layout (README, Layout): imports run one way, down the floors, with no cycle (lazy imports inside
functions count: they run too), and no function is over 100 lines. Read from the sources' syntax trees: nothing is
imported or run."""
import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "glm4v_ms")
MAX_LINES = 100

# each module's floor (README's Layout); a module imports only from its own floor or below
HOST, DEVICE, MODEL, ENGINES, FACES = range(5)
FLOORS = {
    HOST: ["config", "generation_config", "rope", "processing", "processing.*", "safetensors_io", "kernel_limits",
           "outputs"],
    DEVICE: ["device", "attention", "ascend_emulation", "moe_kernels", "parallel", "compile_cache", "shapes"],
    MODEL: ["layers", "text", "moe", "vision", "weights", "quant", "quant_layers"],
    ENGINES: ["prompt", "steps", "reuse", "batch", "sampling", "generation", "beam", "engine", "multi_lora",
              "finetune.forward", "finetune.lora", "finetune.adapter", "finetune.optim", "finetune.plan",
              "finetune.interrupt", "finetune.args", "finetune.data", "finetune.plot", "finetune.distributed",
              "finetune.full", "finetune.tensor_parallel"],
    FACES: ["", "model", "faces", "generate_cli", "demo", "cli", "convert", "convert.*", "serve", "serve.*",
            "parity", "parity.*", "finetune", "finetune.__main__", "finetune.trainer", "finetune.merge",
            "finetune.export"],
}
NAMES = ["host", "device", "model", "engines", "faces"]


def modules() -> dict:
    """'text', 'serve.app', 'processing', ...: path; '' is the package itself."""
    out = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len("__init__")].rstrip(".") if rel.endswith("__init__") else rel] = os.path.join(d, f)
    return out


def floor(name: str):
    for level, names in FLOORS.items():
        for n in names:
            if name == n or (n.endswith(".*") and name.startswith(n[:-1])):
                return level
    return None


def imports(mods: dict) -> dict:
    """module -> the package's modules it imports (at the top or inside a function)."""
    edges = {}
    for name, path in mods.items():
        package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
        package = [p for p in package if p]
        got = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                elif (node.module or "").split(".")[0] == "glm4v_ms":
                    base = node.module.split(".")[1:]
                else:
                    continue
                for a in node.names:
                    full = ".".join(base + [a.name])
                    targets.append(full if full in mods else ".".join(base))
            elif isinstance(node, ast.Import):
                targets = [a.name[len("glm4v_ms."):] for a in node.names if a.name.startswith("glm4v_ms.")]
            got.update(t for t in targets if t in mods and t != name)
        edges[name] = got
    return edges


def cycles(edges: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_floor():
    missing = sorted(m or "glm4v_ms" for m in modules() if floor(m) is None)
    assert not missing, f"modules without a floor in tests/test_layout.py (and README's Layout): {missing}"


def test_no_import_cycle():
    assert cycles(imports(modules())) == []


def test_imports_run_down_the_floors():
    edges = imports(modules())
    up = sorted(f"{a or 'glm4v_ms'} ({NAMES[floor(a)]}) imports {b or 'glm4v_ms'} ({NAMES[floor(b)]})"
                for a, bs in edges.items() for b in bs
                if floor(a) is not None and floor(b) is not None and floor(b) > floor(a))
    assert up == []


def test_no_function_over_100_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert long == []


def test_the_check_sees_a_cycle_and_an_upward_import():
    """The checks themselves: a two-module circle is found, and the real graph has the edges it should."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    edges = imports(modules())
    assert "generation" in edges["model"] and "layers" in edges["text"] and "model" not in edges["generation"]
