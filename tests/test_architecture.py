"""The house's rules, read from the source: no import cycle anywhere in the package (imports inside
functions count too), the SAE and reader packages never import the harvest or open_clip, and
`import activation_store` offers what a researcher reaches for without importing torch."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "activation_store"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of the package that `path` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else names of a
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_a_cycle_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert len(edges) > 40 and edges["activation_store.sae.evaluate"], "the walker found no imports"
    assert cycles(edges) == []


def test_readers_and_sae_never_import_the_harvest_or_open_clip():
    known = modules()
    for name, path in known.items():
        if name.startswith(("activation_store.readers", "activation_store.sae", "activation_store.store")):
            bad = {m for m in imports_of(path, known) if m.startswith("activation_store.harvest")}
            text = path.read_text()
            assert not bad, f"{name} imports {bad}"
            assert "open_clip" not in {n.split(".")[0] for n in _third_party(text)}, f"{name} imports open_clip"


def _third_party(text: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return names


def test_the_package_offers_the_research_api_lazily_without_torch():
    code = """
import sys
import activation_store as a
assert "torch" not in sys.modules and "zarr" not in sys.modules, "import activation_store imported torch or zarr"
names = ["open_store", "ActivationStore", "StoreConfig", "ImageRecord", "ShuffledReader", "OrderedReader",
         "ReaderConfig", "TopKSAE", "load_sae", "train", "evaluate"]
a.open_store, a.StoreConfig
assert "torch" not in sys.modules, "the store's names imported torch"
for n in names:
    assert getattr(a, n) is not None and n in dir(a), n
from activation_store import TopKSAE, load_sae, train
print(a.__version__)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from importlib.metadata import version

    assert done.stdout.strip() == version("activation-store")
