"""MkDocs hook: the site's home page is the README, so the two never drift apart. Its links into docs/ become
site links; links to other files of the repository (bench/README.md) become the path in
code, since the site holds only docs/."""

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)#\s]+)([^)]*)\)")


def site_link(match: re.Match) -> str:
    bang, text, target, rest = match.groups()
    if target.startswith(("http://", "https://", "mailto:")):
        return match[0]
    if target.startswith("docs/"):
        return f"{bang}[{text}]({target.removeprefix('docs/')}{rest})"
    return f"{text} (`{target}`)"                       # a file outside the site


def home() -> str:
    return LINK.sub(site_link, (ROOT / "README.md").read_text())


def on_files(files, config):
    files.append(File.generated(config, "index.md", content=home()))
    return files
