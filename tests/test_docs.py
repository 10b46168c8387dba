"""The docs site (mkdocs.yml, docs/) cannot drift from the code: every page the nav links exists (and every page is
linked), and every ``memmgr.``-qualified name written in docs/ (in prose, code blocks and the API reference's
``::: identifier`` lines) resolves by import. The site build itself (``mkdocs build --strict``) runs in CI
(.ci/run), not here."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

# memmgr followed by one or more .identifier parts (memmgr/guard.py, memmgr-bench, reference/memmgr.md do not match)
NAME = re.compile(r"(?<![\w./-])memmgr(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
# `from memmgr.x import a, b` in the snippets: each imported name counts as memmgr.x.a
FROM_IMPORT = re.compile(r"^\s*from\s+(memmgr(?:\.\w+)*)\s+import\s+([\w, ]+)$", re.M)


def nav_pages() -> list[str]:
    """The .md paths the nav of mkdocs.yml links (read without a YAML parser: `- Title: path.md` lines)."""
    text = MKDOCS.read_text()
    nav = text[text.index("\nnav:"):]
    return re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M)


def doc_files() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def documented_names() -> dict[str, list[str]]:
    """Every memmgr.-qualified name in docs/ -> the pages that write it."""
    found: dict[str, list[str]] = {}
    for page in doc_files():
        text = page.read_text()
        names = NAME.findall(text)
        for module, imported in FROM_IMPORT.findall(text):
            names += [f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()]
        for name in names:
            found.setdefault(name, []).append(str(page.relative_to(ROOT)))
    return found


def resolve(dotted: str) -> object:
    """The object ``dotted`` names: attributes of the package and its modules, importing submodules as needed
    (``memmgr.swap`` is the function, ``memmgr.swap.swap`` the function in the module of that name)."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    module_path = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        candidate = getattr(obj, part, None)
        rest = parts[i + 1:]
        if candidate is None or (rest and not _has_chain(candidate, rest)):
            # a submodule (not imported yet, or shadowed by a package attribute of the same name)
            candidate = importlib.import_module(f"{module_path}.{part}")
        obj = candidate
        module_path = f"{module_path}.{part}"
    return obj


def _has_chain(obj: object, parts: list[str]) -> bool:
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def test_nav_pages_exist_and_every_page_is_in_the_nav():
    pages = nav_pages()
    assert pages, "mkdocs.yml has no nav entries"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav links pages that do not exist under docs/: {missing}"
    orphans = [str(p.relative_to(DOCS)) for p in doc_files() if str(p.relative_to(DOCS)) not in pages]
    assert not orphans, f"pages under docs/ that the nav does not link: {orphans}"


def test_the_guides_the_issue_asks_for_are_there():
    pages = set(nav_pages())
    for guide in ("concepts", "plain-torch", "megatron", "weight-sync", "memory-reports", "bench",
                  "troubleshooting"):
        assert f"guides/{guide}.md" in pages


def test_every_memmgr_name_in_the_docs_resolves():
    names = documented_names()
    assert len(names) > 20, f"found only {sorted(names)}: is the pattern broken?"
    unresolved = []
    for name, pages in sorted(names.items()):
        if name.startswith("memmgr.sync.engines.vllm"):
            pytest.importorskip("vllm")
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            unresolved.append(f"{name} (in {', '.join(sorted(set(pages)))}): {exc!r}")
    assert not unresolved, "names in docs/ that do not resolve:\n" + "\n".join(unresolved)


def test_the_resolver_fails_on_a_wrong_name():
    with pytest.raises((ImportError, AttributeError)):
        resolve("memmgr.MemoryManager.no_such_method")
    with pytest.raises((ImportError, AttributeError)):
        resolve("memmgr.sync.no_such_module")
    assert resolve("memmgr.swap.swap") is resolve("memmgr.swap")
