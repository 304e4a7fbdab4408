"""faiss, imported when the data engine first needs it: the rest of tipstorch runs without it."""

from __future__ import annotations

from types import ModuleType


def require_faiss() -> ModuleType:
    """The ``faiss`` module, or one clear error saying how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "the data engine (tipstorch curate) needs faiss: pip install 'tipstorch[engine]' (faiss-cpu)"
        ) from error
    return faiss
