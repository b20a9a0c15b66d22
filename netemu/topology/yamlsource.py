"""Reading YAML files into plain Python data, with errors that name the line.

PyYAML's safe loader is used with two changes that match what Kubernetes does with
the same text (sigs.k8s.io/yaml in strict mode):
- a key repeated in one mapping is an error (PyYAML silently keeps the last one);
- each document's first line is kept, so callers can point at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .model import TopologyError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:           # unhashable key: let PyYAML report it
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f'mapping key "{key}" already defined at line {first}',
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


@dataclass
class Document:
    index: int          # 1-based position in the file, counting every document
    line: int           # 1-based line where the document starts
    data: Any           # None for an empty document


def _yaml_error(display: str, exc: yaml.YAMLError) -> TopologyError:
    """PyYAML's complaint as a one-line error whose `where` is the line and column."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}; {problem}" if context else problem
    where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return TopologyError(display, where, f"invalid YAML: {text}")


def read_text(path: Path, display: str, where: str = "") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TopologyError(display, where, "no such file") from None
    except IsADirectoryError:
        raise TopologyError(display, where, "is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(display, where, f"cannot read: {exc}") from None


def load_documents(text: str, display: str) -> list[Document]:
    """All documents of a (multi-document) YAML text. Raises TopologyError."""
    loader = _StrictLoader(text)
    docs: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            data = loader.construct_document(node) if node is not None else None
            line = node.start_mark.line + 1 if node is not None else 0
            docs.append(Document(index=len(docs) + 1, line=line, data=data))
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc) from None
    finally:
        loader.dispose()
    return docs
