"""Kubernetes API knowledge in one place.

kinds.py is the table of kinds (resources, names, versions, scope, store
paths) that the store, the API server, the loader and the CLI read;
selectors.py, jsonpatch.py, strategicpatch.py and protobuf.py serve the API
server's requests.
"""
