"""The docs that are generated stay in step with the code: the configuration reference page is the schema's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from diffunet import reference
from diffunet.config import load_config

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
    rows = {line.split("|")[1].strip().strip("`"): line for line in page.splitlines() if line.startswith("| `")}
    keys = list(flat_keys(OmegaConf.to_container(load_config())))
    assert sorted(rows) == sorted(keys)                                 # every key of a run's config, no other
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
    for page in ("sampling", "configuration", "recipes/default", "report", "api"):
        assert (site / page / "index.html").is_file(), page
