"""The package's import graph: no circles (every import counted, those inside functions too: a circle kept legal
by an import inside a function is still one), and ``diffunet/model/`` importing nothing of the toolkit, since an
exported pipeline folder carries that folder alone. The walk is ``scripts/tree_report.py``'s, which prints the
same check for anyone to rerun."""

import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tree_report", ROOT / "scripts" / "tree_report.py")
tree_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tree_report)

MODEL = ROOT / "diffunet" / "model"
# what the model folder may import: the standard library, torch, diffusers, einops, and numpy and PIL, which
# diffusers itself requires (the segmentation pipeline returns masks as both)
MODEL_MAY_IMPORT = {"torch", "diffusers", "einops", "numpy", "PIL"}


def test_the_package_has_no_import_circle():
    assert tree_report.cycles(tree_report.import_graph()) == []


def test_a_circle_is_found_where_there_is_one(tmp_path):
    """The walk sees a circle through an import inside a function, and one through a package's __init__."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("x = 1\n\ndef f():\n    from .a import y\n")
    (package / "sub" / "__init__.py").write_text("from .c import z\n")
    (package / "sub" / "c.py").write_text("z = 1\n\ndef g():\n    from ..d import w\n")
    (package / "d.py").write_text("from .sub.c import z\nw = 2\n")
    assert tree_report.cycles(tree_report.import_graph(package)) == [["pkg.a", "pkg.b"],
                                                                      ["pkg.d", "pkg.sub", "pkg.sub.c"]]


def test_the_model_folder_imports_only_torch_diffusers_einops_and_itself():
    outside = []
    for path in sorted(MODEL.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                if node.level > 1:                                  # from ..x: out of the folder
                    outside.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
                continue
            names = [node.module] if isinstance(node, ast.ImportFrom) else \
                [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                top = name.split(".")[0]
                if top not in MODEL_MAY_IMPORT and top not in sys.stdlib_module_names and top != "__future__":
                    outside.append(f"{path.name}: {name}")
    assert outside == []
