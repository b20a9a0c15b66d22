"""Kubernetes API knowledge in one place, pure and without I/O.

  kinds.py           THE table of kinds: resources, names, versions, scope, store paths
  selectors.py       label and field selectors: the one parser, matcher and formatter
  ownership.py       owner references (which controller an object belongs to)
  jsonpatch.py, strategicpatch.py, protobuf.py   request bodies the API server decodes

The store, the API server, the loader, the controllers and the CLI read these;
none keeps a table or an engine of its own (tests/unit/test_kinds.py,
test_selectors.py).
"""
