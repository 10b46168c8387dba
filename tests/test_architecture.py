"""The package's rings hold: the runtime imports no tooling, modules form no import cycle, and no module imports
another module's private names."""
import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "memmgr"
TOOLING = ("click", "tqdm", "matplotlib", "numpy")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Every import the module can execute (also inside functions), without those under ``if TYPE_CHECKING:``."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def imported_memmgr_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    found = set()
    for node in runtime_imports(tree):
        targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        if isinstance(node, ast.ImportFrom) and node.module:
            targets += [f"{node.module}.{a.name}" for a in node.names]
        found |= {t for t in targets if t in known and t != name}
    return found


def test_memmgr_modules_form_no_import_cycle():
    trees = modules()
    graph = {name: imported_memmgr_modules(name, tree, set(trees)) for name, tree in trees.items()}
    # a package's __init__ re-exports its children; an edge child -> parent package is not a cycle of concepts
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_module_imports_private_names_of_another():
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memmgr"):
                offenders += [f"{name} imports {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_pinned"]
    assert offenders == []


VLLM_WORKER_SIDE = ("memmgr.sync.engines.vllm.worker", "memmgr.sync.engines.vllm.served",
                    "memmgr.sync.engines.vllm.sleep")
VLLM_TRAINER_SIDE = ("memmgr.sync.engines.vllm.trainer", "memmgr.sync.engines.vllm.trainer_engine",
                     "memmgr.sync.engines.vllm.source",
                     "memmgr.sync.engines.vllm.plan", "memmgr.sync.engines.vllm.client")


def test_vllm_worker_side_and_trainer_side_do_not_import_each_other():
    trees = modules()
    graph = {name: imported_memmgr_modules(name, tree, set(trees)) for name, tree in trees.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    # the package itself (imported before any of its modules) imports neither side
    offenders = [f"{a} imports {b}" for side, other in ((VLLM_WORKER_SIDE, VLLM_TRAINER_SIDE),
                                                         (VLLM_TRAINER_SIDE, VLLM_WORKER_SIDE),
                                                         (("memmgr.sync.engines.vllm",),
                                                          VLLM_WORKER_SIDE + VLLM_TRAINER_SIDE))
                 for a in side for b in sorted(reach(a) & set(other))]
    assert offenders == []


def test_runtime_ring_never_imports_the_tools_ring():
    offenders = []
    for name, tree in modules().items():
        if name.startswith("memmgr.tools") or name == "memmgr.__main__":  # `python -m memmgr` is the tools' CLI
            continue
        for node in runtime_imports(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{name} imports {t}" for t in targets
                          if t.startswith("memmgr.tools") or t.split(".")[0] in TOOLING]
    assert offenders == []


@pytest.mark.parametrize("blocked", [TOOLING])
def test_import_memmgr_works_without_the_tooling_packages(blocked):
    runtime = [n for n in modules() if not n.startswith("memmgr.tools") and n != "memmgr.__main__"
               and n != "memmgr.integrations.megatron"
               and not n.startswith("memmgr.sync.engines.vllm")]  # optional engines
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError("blocked: " + name)
for m in list(sys.modules):
    if m.split(".")[0] in {blocked!r}:
        del sys.modules[m]
sys.meta_path.insert(0, Block())
import torch, importlib
for m in {runtime!r}:
    importlib.import_module(m)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok []"


def test_no_benchmark_or_example_puts_tests_on_sys_path():
    """The benchmarks and examples import their models and the CPU shim from ``memmgr.tools`` and the lab's engines
    from ``benchmarks/lab.py``, never from tests/."""
    root = PACKAGE.parent
    hops = {str(p.relative_to(root)) for d in ("benchmarks", "examples") for p in sorted((root / d).rglob("*.py"))
            if any("sys.path" in line and "tests" in line for line in p.read_text().splitlines())}
    assert hops == set()


RUNTIME_MODULE_LINE_LIMIT = 600


def test_no_runtime_module_exceeds_the_line_limit():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name.startswith("memmgr.tools") or name == "memmgr.__main__":
            continue
        lines = len(path.read_text().splitlines())
        if lines > RUNTIME_MODULE_LINE_LIMIT:
            offenders[name] = lines
    assert offenders == {}, f"split these modules (at most {RUNTIME_MODULE_LINE_LIMIT} lines each): {offenders}"


def test_budget_reaches_the_manager_through_public_members_only():
    tree = ast.parse((PACKAGE / "budget.py").read_text())
    private = [f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
               and not (isinstance(node.value, ast.Name) and node.value.id == "self")]
    assert private == []


def test_transports_import_nothing_above_them():
    offenders = []
    for name, tree in modules().items():
        if not name.startswith("memmgr.sync.transports"):
            continue
        for node in runtime_imports(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{name} imports {t}" for t in targets
                          if t == "memmgr.sync" or t == "memmgr.manager" or t.startswith("memmgr.integrations")
                          or t.startswith(("memmgr.sync.session", "memmgr.sync.engines", "memmgr.sync.export"))]
    assert offenders == []


def test_one_module_of_the_weight_sync_broadcasts():
    """Every byte of a weight sync goes through ``memmgr.sync.comm``: no other module calls a torch.distributed
    broadcast (or builds its options) itself."""
    callers = set()
    for name, tree in modules().items():
        if not name.startswith("memmgr.sync"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("BroadcastOptions", "broadcast_object_list"):
                callers.add(name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "broadcast" \
                    and ast.unparse(node.func.value) in ("dist", "torch.distributed"):
                callers.add(name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "broadcast" \
                    and ast.unparse(node.func.value).endswith(".backend"):
                callers.add(name)
    assert callers == {"memmgr.sync.comm"}
