"""Kubernetes API knowledge in one place: kinds, their resources and versions.

Only kinds.py lives here so far; the API server (netemu.apiserver) reads it.
Moving the CLI's pluralisers (cli.py, workloads_cli.py) and registry.KINDS onto
it is the next step of issue 13.
"""
