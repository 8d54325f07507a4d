"""The package layout holds (docs/design.md §7): two installed packages, one-way imports
between them, no import cycles, module-level imports in experiments/, no stale spec
references, and models/ free of I/O."""
import ast
import glob
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("surgfusion_jax", "data_prep", "experiments")


def _modules(package):
    """{dotted module name: path} of every .py file under `package`."""
    out = {}
    for path in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        out[".".join(rel)] = path
    return out


ALL = {name: path for p in PACKAGES for name, path in _modules(p).items()}


def _imports(path, module_level_only=False):
    """Dotted names a file imports (`from a.b import c` gives a.b.c when that is a module)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    nodes = tree.body if module_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in ALL else node.module)
    return out


def _function_level_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = set(map(id, tree.body))
    return [n.lineno for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top
            and not any(n is s for b in tree.body if isinstance(b, ast.If) for s in b.body)]


def test_the_library_never_imports_the_prep_stage():
    offenders = {name: sorted(i for i in _imports(path) if i.split(".")[0] == "data_prep")
                 for name, path in _modules("surgfusion_jax").items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_models_are_pure_flax():
    allowed = ("surgfusion_jax.models", "surgfusion_jax.data.feature_dataset")
    models = _modules(os.path.join("surgfusion_jax", "models"))
    assert len(models) >= 10
    for name, path in models.items():
        ours = {i for i in _imports(path) if i.startswith("surgfusion_jax")}
        assert all(i.startswith(allowed) for i in ours), (name, ours)
        assert not {"os", "json", "tensorflow", "orbax"} & {i.split(".")[0] for i in _imports(path)}


def test_no_import_cycles():
    graph = {name: {i for i in _imports(path, module_level_only=True) if i in ALL and i != name}
             for name, path in ALL.items()}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_experiments_import_at_module_level():
    found = {name: _function_level_imports(path) for name, path in _modules("experiments").items()}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_reference_to_a_spec_outside_the_repository():
    for name, path in ALL.items():
        assert "SPEC" not in open(path, encoding="utf-8").read(), name


def test_a_wheel_installs_exactly_two_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), REPO],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info" not in n} == {"surgfusion_jax",
                                                                         "data_prep"}
    assert "surgfusion_jax/evaluation/paper_tables.json" in names


@pytest.mark.parametrize("name", ["surgfusion_jax", "surgfusion_jax.data.feature_dataset"])
def test_light_imports_do_not_load_jax(name):
    code = f"import sys, {name}; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=REPO, timeout=120).stdout.strip()
    assert out == "False"
