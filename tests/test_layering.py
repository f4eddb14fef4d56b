"""The layering of vitedge's own modules, as the code states it.

Every module imports the vitedge modules it uses at its top, so the import graph read from those
statements is the real one; it must have no cycle (a cycle means a function sits on the wrong floor).
Imports inside functions are for heavy third-party libraries only; the few vitedge imports that still
sit inside functions are listed in :data:`ALLOWED_IN_FUNCTION`, each with its reason.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import vitedge

PACKAGE = Path(vitedge.__file__).parent

#: (importing module, imported module, reason): a vitedge import allowed inside a function.  A name covers the
#: module and everything below it.  Each entry must still be needed (see test_allow_list_has_no_stale_entry).
ALLOWED_IN_FUNCTION = [
    ("vitedge", "vitedge.graph",
     "vitedge.graph is the onnx_ir floor (it imports onnx_ir at its top): a heavy library stays out of `import vitedge`"),
    ("vitedge.quantization.worker", "vitedge.quantization.candidates",
     "the candidates module loads onnx_ir (vitedge.graph) and runs NNCF: only the worker process needs it, not the search"),
]

#: heavy third-party libraries that neither `import vitedge` nor `vitedge --help` may load (torch is not
#: among them: the model classes need it at import)
HEAVY = ("onnx", "onnxruntime", "openvino", "nncf", "onnx_ir", "transformers", "tensorrt", "scipy", "ray")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The vitedge modules an import statement loads: ``from .a import b`` is ``a.b`` when that is a module, else ``a``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _under(a.name, "vitedge")]
    if node.level:
        base = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if not _under(source, "vitedge"):
        return []
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(importer: str) -> tuple[set[str], list[tuple[str, int]]]:
    """(vitedge modules imported at module level, [(vitedge module, line)] imported inside functions).
    Imports under ``if TYPE_CHECKING:`` are for annotations only and count as neither."""
    top: set[str] = set()
    inner: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, importer):
                    if in_function:
                        inner.append((target, child.lineno))
                    else:
                        top.add(target)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[importer].read_text()), False)
    return top, inner


def _graph() -> dict[str, set[str]]:
    return {m: {t for t in _imports(m)[0] if t in MODULES and t != m} for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "vitedge.__main__"))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle among vitedge modules: " + " -> ".join(cycle or [])


def test_cycle_finder_names_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_preprocessing_sits_low():
    """Resolving preprocessing needs only errors and preprocess, and describing a foreign ONNX file does not reach
    up to the runtime or parity checks that use it (formerly test_preprocess_resolver's import-circle test)."""
    graph = _graph()
    assert graph["vitedge.preprocessing_resolver"] <= {"vitedge.errors", "vitedge.preprocess"}
    assert "vitedge.preprocessing_resolver" not in graph["vitedge.preprocess"]
    assert not {"vitedge.parity", "vitedge.runtime"} & graph["vitedge.foreign"]


def _allowed(importer: str, target: str) -> bool:
    return any(_under(importer, i) and _under(target, t) for i, t, _ in ALLOWED_IN_FUNCTION)


def test_vitedge_imports_sit_at_module_level():
    hidden = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {t} inside a function"
              for m in MODULES for t, line in _imports(m)[1] if not _allowed(m, t)]
    assert not hidden, ("import vitedge modules at the top of the module (a cycle that this creates is a layering "
                        "bug: move the function to the floor it belongs on):\n" + "\n".join(hidden))


def test_allow_list_has_no_stale_entry():
    used = {(i, t) for m in MODULES for target, _ in _imports(m)[1]
            for i, t, _ in ALLOWED_IN_FUNCTION if _under(m, i) and _under(target, t)}
    stale = [(i, t) for i, t, _ in ALLOWED_IN_FUNCTION if (i, t) not in used]
    assert not stale, f"no in-function import needs these ALLOWED_IN_FUNCTION entries any more: remove {stale}"


def test_graph_floor_is_what_makes_it_heavy():
    """The graph entry is honest: vitedge.graph loads onnx_ir when imported, which `import vitedge` must not."""
    top = {n.names[0].name for n in ast.parse(MODULES["vitedge.graph"].read_text()).body if isinstance(n, ast.Import)}
    assert "onnx_ir" in top


def test_import_and_help_stay_light():
    code = ("import sys, vitedge, vitedge.cli.main\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`import vitedge` / the CLI now load heavy libraries at import: {out}"
