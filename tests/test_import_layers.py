"""The package layers: models <- weights, data <- train, eval <- cli (``tools/import_graph.py``)."""

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"
spec = importlib.util.spec_from_file_location("import_graph", TOOL)
import_graph = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = import_graph  # dataclasses look their module up there
spec.loader.exec_module(import_graph)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_no_tipstorch_module_imports_upward_or_across_layers():
    edges = import_graph.import_edges()
    assert any(edge.importer == "tipstorch.cli.train" for edge in edges)  # the real package was read
    assert import_graph.violations(edges) == []


def test_lazy_upward_and_cross_layer_imports_are_reported(tmp_path):
    root = write_tree(tmp_path / "tipstorch", {
        "__init__.py": "", "models/__init__.py": "", "train/__init__.py": "", "eval/__init__.py": "",
        "models/vit.py": "def build():\n    from tipstorch.train.loop import Trainer\n",
        "train/loop.py": "from tipstorch.models import vit\nfrom . import schedules\n",
        "train/schedules.py": "",
        "eval/quick.py": "import tipstorch.train.loop\n",
    })
    found = import_graph.violations(import_graph.import_edges(root))
    assert found == [
        "tipstorch.eval.quick:1 imports tipstorch.train.loop: across a layer (eval is layer 2, train layer 2)",
        "tipstorch.models.vit:2 imports tipstorch.train.loop: upward (models is layer 0, train layer 2)",
    ]


def test_relative_imports_resolve_to_the_module_they_name(tmp_path):
    root = write_tree(tmp_path / "tipstorch", {
        "__init__.py": "", "train/__init__.py": "", "train/schedules.py": "",
        "train/loop.py": "from . import schedules\nfrom .schedules import x\n",
        "cli/__init__.py": "from ..train import loop\n",
    })
    edges = {(e.importer, e.imported) for e in import_graph.import_edges(root)}
    assert edges == {("tipstorch.train.loop", "tipstorch.train.schedules"), ("tipstorch.cli", "tipstorch.train.loop")}
