"""The package's layout rules, as CONTRIBUTING.md states them: which sub-package may import which, no import cycles,
imports at module top (only optional heavy dependencies inside functions), and no process-wide side effects on import.

The rules are read from the source with `ast`, not from what happens to be imported at run time, so an import
hidden in a rarely used function is caught too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "loratv"

# the layers, lowest first; a module may import its own sub-package and any sub-package listed here for it
MAY_IMPORT = {
    "errors": set(),
    "version": set(),
    "common": {"errors"},
    "io": {"errors", "version", "common"},
    "numerics": {"errors", "common"},
    "exec": {"errors", "common", "io"},
    "models": {"errors", "common", "io", "numerics"},
    "adapters": {"errors", "common", "io", "numerics", "models"},
    "merging": {"errors", "common", "io", "numerics"},
    "report": {"errors", "version", "common", "io", "numerics"},
    "ops": {"errors", "version", "common", "io", "numerics", "models", "adapters", "merging", "exec", "report"},
    "api": {"errors", "version", "common", "io", "numerics", "models", "adapters", "merging", "exec", "report", "ops"},
    "example": {"errors", "version", "common", "io", "numerics", "models", "adapters", "merging", "exec", "report", "ops", "api"},
    "__init__": {"errors", "version", "common", "io", "numerics", "models", "adapters", "merging", "exec", "report", "ops", "api",
                 "example"},
    "cli": {"errors", "version", "common", "io", "numerics", "models", "adapters", "merging", "exec", "report", "ops", "api",
            "example", "__init__"},
}
# imported inside functions on purpose: heavy, and needed only by some commands (transformers for in-memory layouts
# and config-only inspect, peft for its tuners, huggingface_hub for hub ids, matplotlib for plots, scipy for
# similarity's clustering, ray for --executor ray, fsspec and s3fs for object-store paths)
LAZY_ALLOWED = {"transformers", "peft", "huggingface_hub", "matplotlib", "scipy", "ray", "fsspec", "s3fs"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _area(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _loratv_imports(tree):
    """(line, imported module) for every import of a loratv module, `from loratv.x import name` resolved to the
    module `loratv.x.name` where that is a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loratv":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (SRC / (candidate.replace(".", "/") + ".py")).exists() or \
                    (SRC / candidate.replace(".", "/")).is_dir()
                yield node.lineno, candidate if is_module else node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "loratv":
                    yield node.lineno, alias.name


def test_the_layers_are_the_documented_ones():
    areas = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert areas == set(MAY_IMPORT), "CONTRIBUTING.md's package map and this test must name every sub-package"


def test_each_sub_package_imports_only_the_layers_below_it():
    bad = []
    for name, path, tree in _modules():
        area = _area(name)
        for line, target in _loratv_imports(tree):
            other = _area(target)
            if other != area and other not in MAY_IMPORT[area]:
                bad.append(f"{path.relative_to(SRC)}:{line}: {area} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for _, t in _loratv_imports(tree)} for name, _, tree in _modules()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_imports_sit_at_module_top():
    bad = []
    for _name, path, tree in _modules():
        top = {id(node) for node in tree.body}
        # try-guarded optional imports, and `if TYPE_CHECKING:` imports that never run
        guarded = {id(n) for node in tree.body
                   if isinstance(node, ast.Try) or (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
                   for n in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and id(node) not in guarded:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if (module or "").split(".")[0] not in LAZY_ALLOWED:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno}: import of {module} inside a function")
    assert not bad, "\n".join(bad)


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _import_everything() -> str:
    modules = sorted(name for name, _, _ in _modules() if not name.endswith("__main__"))
    return "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)


def test_importing_every_module_has_no_process_wide_effect():
    """No matplotlib backend chosen and no pyplot, the torch thread count, signal handlers and the working folder
    as they were."""
    out = _fresh(
        "import os, signal, torch\n"
        "threads, cwd = torch.get_num_threads(), os.getcwd()\n"
        "handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}\n"
        + _import_everything() +
        "import sys, matplotlib\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.rcParams._get_backend_or_none()\n"
        "assert torch.get_num_threads() == threads and os.getcwd() == cwd\n"
        "assert {s: signal.getsignal(s) for s in handlers} == handlers\n"
        "print('ok')\n")
    assert out.strip() == "ok"


@pytest.mark.parametrize("missing", ["fcntl", "resource"])
def test_imports_without_posix_only_modules(missing):
    """Windows has neither fcntl nor resource: every module must still import there."""
    out = _fresh(f"import sys\nsys.modules[{missing!r}] = None  # import of it raises ImportError\n"
                 + _import_everything() + "print('ok')\n")
    assert out.strip() == "ok"


def test_import_loratv_is_light_and_every_public_name_resolves():
    """`import loratv` loads no torch (the API loads on first use), and each name in `__all__` is reachable."""
    out = _fresh(
        "import sys, loratv\n"
        "assert not {'torch', 'numpy'} & set(sys.modules), sorted({'torch', 'numpy'} & set(sys.modules))\n"
        "missing = [n for n in loratv.__all__ if getattr(loratv, n, None) is None]\n"
        "assert not missing, missing\n"
        "assert callable(loratv.merge) and loratv.merge.__module__ == 'loratv.api.functions'\n"
        "assert set(loratv.__all__) <= set(dir(loratv))\n"
        "print('ok')\n")
    assert out.strip() == "ok"


def _raises(fn) -> bool:
    return any(isinstance(n, ast.Raise) and n.exc is not None for n in ast.walk(fn))


def _returns_a_value(fn) -> bool:
    """A `return <value>` in fn's own body (not in a nested function or class)."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None and \
                not (isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        stack.extend(ast.iter_child_nodes(node))
    return False


def _parameters(fn) -> list:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_public_functions_have_args_returns_raises_docstrings():
    """Every public function and method says what it takes (Args), what it returns (Returns) and what it raises
    (Raises) where its body does;
    a method overriding a documented one of a loratv base class inherits that documentation."""
    trees = [(path, tree) for _, path, tree in _modules()]
    classes = {n.name: n for _, tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}

    def documented_in_base(cls, method, seen=()):
        for base in cls.bases:
            name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", None)
            parent = classes.get(name)
            if parent is None or name in seen:
                continue
            if any(isinstance(m, ast.FunctionDef) and m.name == method and ast.get_docstring(m) for m in parent.body):
                return True
            if documented_in_base(parent, method, seen + (name,)):
                return True
        return False

    bad = []

    def check(fn, where, path):
        doc = ast.get_docstring(fn)
        problems = [] if doc else ["no docstring"]
        if doc and _parameters(fn) and "Args:" not in doc:
            problems.append("no Args")
        if doc and _raises(fn) and "Raises:" not in doc:
            problems.append("no Raises")
        if doc and _returns_a_value(fn) and "Returns:" not in doc and "Yields:" not in doc:
            problems.append("no Returns")
        if problems:
            bad.append(f"{path.relative_to(SRC)}:{fn.lineno} {where}: {', '.join(problems)}")

    for path, tree in trees:
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                check(node, node.name, path)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for m in node.body:
                    if not isinstance(m, ast.FunctionDef) or m.name.startswith("_"):
                        continue
                    is_property = any(isinstance(d, ast.Name) and d.id == "property" for d in m.decorator_list)
                    if is_property:
                        if not ast.get_docstring(m):
                            bad.append(f"{path.relative_to(SRC)}:{m.lineno} {node.name}.{m.name}: no docstring")
                    elif not documented_in_base(node, m.name) or ast.get_docstring(m):
                        doc = ast.get_docstring(m)
                        if doc and documented_in_base(node, m.name) and "Args:" not in doc:
                            continue  # a one-line note on an override; the base documents the arguments
                        check(m, f"{node.name}.{m.name}", path)
    assert not bad, f"{len(bad)} public functions lack documentation:\n" + "\n".join(bad)
