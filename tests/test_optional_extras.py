"""The base install (``pip install tipstorch[train]``) runs every command's parser and the main job: the
optional extras (engine: faiss / matplotlib / transformers, demo: gradio / playwright) load only when
the command that needs them runs."""

import subprocess
import sys

OPTIONAL = ("faiss", "gradio", "playwright", "matplotlib", "transformers")

PROBE = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # "not installed": importing it raises ImportError
from tipstorch.cli import build_parser
parser = build_parser()
parser.parse_args(["train", "--steps", "1"])
import tipstorch.engine.curation, tipstorch.engine.dedup
print("imported without", {OPTIONAL!r})
"""


def test_the_cli_and_the_engine_modules_import_without_the_optional_extras():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_engine_names_its_extra_when_faiss_is_missing(monkeypatch):
    from tipstorch.engine.faiss_import import require_faiss

    monkeypatch.setitem(sys.modules, "faiss", None)
    try:
        require_faiss()
    except ImportError as error:
        assert "tipstorch[engine]" in str(error)
    else:
        raise AssertionError("require_faiss() did not fail without faiss")
