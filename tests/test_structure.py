"""The package's shape holds (issue 34): no import cycle, small modules and functions, a pure planning package,
every foreign function declared in one module. Read from the sources with `ast`: nothing is imported."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "edgecad"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
LONG_ON_PURPOSE = {"edgecad.cli.build_parser",  # the command line, flag by flag
                   "edgecad.tiny.write_model"}  # the tiny model's tensor list
MAX_ENGINE_LINES = 320
PURE = "edgecad.plan"  # may import only these of edgecad (values, no IO) and nothing that reaches C or the system
PURE_MAY_IMPORT = {"edgecad.errors", "edgecad.gguf_file"}
PURE_MAY_NOT = {"os", "sys", "time", "ctypes", "subprocess", "socket", "psutil", "llama_cpp", "threading"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = (p, ast.parse(p.read_text(), str(p)))
    return out


MODULES = _modules()


def _imports(name: str, path: Path, tree: ast.Module) -> tuple[set[str], set[str]]:
    """(edgecad modules `name` imports anywhere in it, inside functions too; other top-level packages)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    ours, others = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` imports the submodule x (the package itself is already importing)
            cands = ([mod] if node.module else []) + [f"{mod}.{a.name}" for a in node.names]
            if mod.split(".")[0] != "edgecad":
                others.add(mod.split(".")[0])
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
            others |= {a.name.split(".")[0] for a in node.names if not a.name.startswith("edgecad")}
        else:
            continue
        ours |= {c for c in cands if c in MODULES and c != name}
    return ours, others


GRAPH = {name: _imports(name, p, t)[0] for name, (p, t) in MODULES.items()}


def test_no_import_cycle():
    """Counting imports inside functions: a cycle hidden behind a late import is still a cycle."""
    seen, stack, cycles = set(), [], []

    def visit(v):
        if v in stack:
            cycles.append(stack[stack.index(v):] + [v])
            return
        if v in seen:
            return
        seen.add(v)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            visit(w)
        stack.pop()

    for v in sorted(GRAPH):
        visit(v)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_are_small(name):
    path, tree = MODULES[name]
    n = len(path.read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{path.name} has {n} lines: split it along its meaning"
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{name}.{f.name}" not in LONG_ON_PURPOSE:
            length = f.end_lineno - f.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{name}.{f.name} has {length} lines"


def test_the_engine_is_the_api_s_edge_only():
    _, tree = MODULES["edgecad.engine"]
    engine = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Engine")
    assert engine.end_lineno - engine.lineno + 1 <= MAX_ENGINE_LINES


def test_planning_imports_nothing_that_does_io():
    for name, (path, tree) in MODULES.items():
        if name == PURE or name.startswith(PURE + "."):
            ours, others = _imports(name, path, tree)
            assert {m for m in ours if not m.startswith(PURE)} <= PURE_MAY_IMPORT, name
            assert not others & PURE_MAY_NOT, f"{name} imports {others & PURE_MAY_NOT}"


def test_foreign_functions_are_declared_in_one_module():
    """ctypes prototypes (argtypes, restype, CFUNCTYPE) live in native.py; llama.py uses llama_cpp's own."""
    for name, (path, tree) in MODULES.items():
        if name == "edgecad.native":
            continue
        for node in ast.walk(tree):
            declares = (isinstance(node, ast.Attribute) and node.attr in ("argtypes", "restype")
                        and isinstance(node.ctx, ast.Store)) or \
                       (isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("CFUNCTYPE", "CDLL"))
            assert not declares, f"{name} declares a foreign function (line {node.lineno}): move it to native.py"


def test_the_wrapper_knows_no_remote_devices():
    assert not any(m.startswith("edgecad.rpc") for m in GRAPH["edgecad.llama"])
    assert not any(m.startswith("edgecad.rpc") for m in GRAPH["edgecad.engine"])
