"""Reading YAML files into plain Python data, with errors that name the line.

PyYAML's safe loader is used with two changes that match what Kubernetes does with
the same text (sigs.k8s.io/yaml in strict mode):
- a key repeated in one mapping is an error (PyYAML silently keeps the last one);
- each document's first line is kept, so callers can point at it.

Input is bounded, because a topology or manifest may come from anyone and is
read by a process that must stay up:
- only regular files are read, at most MAX_FILE_BYTES of them; a FIFO, a device
  or a directory is refused from its stat(), before any open() that could block
  (a FIFO) or read forever (/dev/zero);
- nesting deeper than MAX_DEPTH is refused while composing (PyYAML composes
  recursively, so 500 nested lists ended in a RecursionError);
- aliases may not expand the document beyond MAX_EXPANDED nodes and characters,
  nor make it recursive: PyYAML shares one object per anchor, but everything
  after it (deepcopy for defaults, JSON for the store) expands every alias, so a
  1 MB string referenced 1,000 times became a 1 GB object. go-yaml, which
  kubectl and the API server use, refuses such files too ("document contains
  excessive aliasing");
- an integer too long for Python's int-from-string limit is a YAML error at its
  line, not a ValueError from deep inside PyYAML.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .model import TopologyError

# The API server refuses request bodies over 3 MiB and etcd objects over 1.5 MiB;
# a manifest file holds many objects, so a few times that.
MAX_FILE_BYTES = 8 * 1024 * 1024
# Kubernetes objects nest about 15 levels deep (a pod template's affinity terms);
# far below Python's recursion limit, which the later steps also recurse into.
MAX_DEPTH = 100
# Nodes plus scalar characters of a document once every alias is expanded.
MAX_EXPANDED = 4 * MAX_FILE_BYTES


def _kind_of_file(mode: int) -> str:
    for test, word in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"


def file_problem(path: Path) -> str | None:
    """Why PATH cannot be read as a manifest or topology file, or None.

    Looks only at stat() (following symlinks), never opens the file.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    except ValueError:                  # a NUL in the path: no file can have that name
        return "invalid path: it contains a NUL character"
    if stat.S_ISDIR(st.st_mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(st.st_mode):
        return f"is {_kind_of_file(st.st_mode)}, not a regular file"
    if st.st_size > MAX_FILE_BYTES:
        return f"is {st.st_size} bytes, larger than the limit of {MAX_FILE_BYTES} bytes"
    return None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, deep nesting and integers
    Python cannot convert."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            # Python's limit on int(str) (4300 digits): no Kubernetes field is
            # wider than 64 bits, so the value is refused, not converted.
            raise yaml.constructor.ConstructorError(
                None, None, f"integer with {len(node.value)} characters is too large", node.start_mark) from None


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


# PyYAML registers constructors as functions of the class that defined them: the
# override above takes effect only once registered for our class.
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)

if getattr(yaml, "__with_libyaml__", False):
    class _StrictCLoader(yaml.cyaml.CParser, _StrictLoader):
        """The same, parsed and composed by libyaml (PyYAML's C binding): a
        1,000-pod topology (200 KB) is read in 0.5 s, against 1.9 s with the
        pure-Python parser (the whole of load_topology, median of 3). Its
        composer does not call compose_node: libyaml refuses nesting beyond
        1,000 levels itself (so its recursion is bounded), and
        _check_expansion refuses more than MAX_DEPTH before anything is
        constructed. The constructor (duplicate keys, integers) is
        _StrictLoader's."""

        def __init__(self, stream):
            yaml.reader.Reader(stream)      # the characters YAML forbids: ReaderError, as before
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _Loader: type = _StrictCLoader
else:
    _Loader = _StrictLoader


@dataclass
class Document:
    index: int          # 1-based position in the file, counting every document
    line: int           # 1-based line where the document starts
    data: Any           # None for an empty document


def _yaml_error(display: str, exc: yaml.YAMLError, text: str) -> TopologyError:
    """PyYAML's complaint as a one-line error whose `where` is the line and column."""
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow (NUL, other control characters);
        # PyYAML gives its offset in the text, not a line.
        line_start = text.rfind("\n", 0, exc.position) + 1
        where = f"line {text.count(chr(10), 0, exc.position) + 1} column {exc.position - line_start + 1}"
        return TopologyError(display, where, f"invalid YAML: unacceptable character #x{exc.character:04x}: "
                             "special characters are not allowed")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}; {problem}" if context else problem
    where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    return TopologyError(display, where, f"invalid YAML: {text}")


def read_text(path: Path, display: str, where: str = "") -> str:
    """The UTF-8 text of a regular file of at most MAX_FILE_BYTES bytes."""
    problem = file_problem(path)
    if problem:
        raise TopologyError(display, where, problem)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, the
        # open still returns at once, and the fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TopologyError(display, where, f"cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TopologyError(display, where, f"is {_kind_of_file(st.st_mode)}, not a regular file")
        try:
            data = f.read(MAX_FILE_BYTES + 1)    # /proc files say size 0: bound the read itself
        except OSError as exc:
            raise TopologyError(display, where, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TopologyError(display, where, f"is larger than the limit of {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TopologyError(display, f"line {line}", f"cannot read: not UTF-8 text "
                            f"(byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def _check_expansion(node, display: str) -> None:
    """Refuse a document whose aliases make it recursive or expand it beyond
    MAX_EXPANDED (nodes plus scalar characters) or MAX_DEPTH levels.

    Each node's expanded size and depth are computed once (aliases point at the
    same node object), so the check costs the size of the text, not of the
    expansion.
    """
    sizes: dict[int, tuple[int, int]] = {}      # id(node) -> (expanded size, depth below)
    open_nodes: set[int] = set()

    def too_much(mark, problem: str) -> TopologyError:
        return TopologyError(display, f"line {mark.line + 1} column {mark.column + 1}", f"invalid YAML: {problem}")

    def walk(n, depth: int) -> tuple[int, int]:
        known = sizes.get(id(n))
        if known is None:
            if id(n) in open_nodes:
                raise too_much(n.start_mark, "an alias refers to a node that contains it (a recursive structure)")
            if depth > MAX_DEPTH:
                raise too_much(n.start_mark, f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded")
            if isinstance(n, yaml.ScalarNode):
                known = (1 + len(n.value), 0)
            else:
                open_nodes.add(id(n))
                children = ([c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode)
                            else list(n.value))
                size, below = 1, 0
                for child in children:
                    s, d = walk(child, depth + 1)
                    size, below = size + s, max(below, d + 1)
                    if size > MAX_EXPANDED:
                        break
                open_nodes.discard(id(n))
                known = (size, below)
            sizes[id(n)] = known
        size, below = known
        if size > MAX_EXPANDED:
            raise too_much(n.start_mark, f"document contains excessive aliasing (it expands to more than "
                           f"{MAX_EXPANDED} nodes and characters)")
        if depth + below > MAX_DEPTH:
            raise too_much(n.start_mark, f"nesting deeper than {MAX_DEPTH} levels once aliases are expanded")
        return known

    walk(node, 0)


def load_documents(text: str, display: str) -> list[Document]:
    """All documents of a (multi-document) YAML text. Raises TopologyError."""
    docs: list[Document] = []
    try:
        # The reader checks the whole text for characters YAML forbids here.
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc, text) from None
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                _check_expansion(node, display)
            data = loader.construct_document(node) if node is not None else None
            line = node.start_mark.line + 1 if node is not None else 0
            docs.append(Document(index=len(docs) + 1, line=line, data=data))
    except yaml.YAMLError as exc:
        raise _yaml_error(display, exc, text) from None
    finally:
        loader.dispose()
    return docs
