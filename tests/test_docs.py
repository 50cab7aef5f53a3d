"""The docs stay in step with the code: the configuration reference page is the schema's, the README stays a few
screens that map every module, and every page of docs/ is on the site's nav."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from diffunet import reference
from diffunet.config import MOVED, load_config

ROOT = Path(__file__).resolve().parents[1]


def flat_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_the_configuration_page_is_the_schemas():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference.page(), "stale: python -m diffunet.reference docs/configuration.md"
    schema, moved = page.split("## Keys that moved")
    rows = {line.split("|")[1].strip().strip("`"): line for line in schema.splitlines() if line.startswith("| `")}
    keys = list(flat_keys(OmegaConf.to_container(load_config())))
    assert sorted(rows) == sorted(keys)                                 # every key of a run's config, no other
    assert all(f"| `{old}` | `{new}` |" in moved and new in keys and old not in keys for old, new in MOVED.items())
    assert all(not line.rstrip().endswith("|  |") for line in rows.values())    # each with what it means


def test_comments_are_read_with_their_continuation_lines():
    source = '''
    a: int = 1          # first
                        # and more
    b: str = "x#y"      # second
    c: float = 0.5
    '''
    assert reference.comments(source) == {"a": "first and more", "b": "second"}


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict`` (the docs extra): every page, link and API docstring resolves; the home page is
    the README, its links into docs/ made site links."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings", reason="the docs extra: pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    home = (site / "index.html").read_text()
    assert "diffunet" in home and 'href="configuration/"' in home and "bench/README.md" in home
    assert "DiffunetPipeline" in (site / "api" / "index.html").read_text()       # the docstrings made it in
    for page in ("quickstart", "generation", "image-conditioned", "segmentation", "sampling", "training",
                 "configuration", "performance", "reliability", "architecture", "recipes/default", "report", "api"):
        assert (site / page / "index.html").is_file(), page


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_readme_is_a_few_screens():
    """What it is, the two commands, the model, the jobs and the map; everything else lives in docs/."""
    assert len((ROOT / "README.md").read_bytes()) <= 10 * 1024


def _docstring_only(path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)


def test_every_module_is_on_the_readmes_map():
    """"Where things are" names every module of diffunet/ by its path (a package by its folder, and its
    ``__init__.py`` where that holds code): a new module without a line there fails here."""
    section = readme_section("Where things are")
    package = ROOT / "diffunet"
    modules = sorted(p.relative_to(package).as_posix() for p in package.rglob("*.py")
                     if p.name != "__init__.py" or (p.parent != package and not _docstring_only(p)))
    modules += sorted(f"{p.relative_to(package).as_posix()}/" for p in package.iterdir() if (p / "__init__.py").is_file())
    assert modules
    assert [m for m in modules if f"`{m}`" not in section] == []


def nav_pages(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from nav_pages(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from nav_pages(value)


def test_every_docs_page_is_on_the_nav_and_every_nav_entry_is_a_page():
    """No page of docs/ is orphaned (the generated configuration reference included); index.md is the README,
    made by the hook scripts/mkdocs_readme.py."""
    nav = list(nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if p not in nav] == []
    assert [p for p in nav if p != "index.md" and p not in pages] == []
    assert len(nav) == len(set(nav))


def test_the_readme_links_every_docs_page():
    """The README's "Documentation" list is the way in from GitHub, where the nav is not shown."""
    section = readme_section("Documentation")
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert [p for p in pages if f"]({p})" not in section] == []
