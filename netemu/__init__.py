"""netemu: a packet-level emulator of Kubernetes pod networking.

`import netemu` is the Python API for scripted experiments (netemu.scripting):

    with netemu.up({"name": "lab", "nodes": [{"name": "a"}, {"name": "b"}]}) as lab:
        print(lab.exec("client", ["ping", "-c1", lab.nodes["a"].address]).stdout)

The names below are imported on first use, not with the package: the CLI, the
daemons and the overlay's workers (`python -m netemu.overlay.fastudp`) import
this package too and must not pay for the API's imports.
"""

_API = {
    # name -> module that defines it
    "up": "netemu.scripting",
    "load": "netemu.scripting",
    "Cluster": "netemu.scripting",
    "ExecResult": "netemu.scripting",
    "benchmark": "netemu.scripting",
    "ApiError": "netemu.api",
    "ClusterError": "netemu.cluster",
    "CliError": "netemu.cli",
    "TopologyError": "netemu.topology.model",
    "ImpairmentError": "netemu.impairment",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'netemu' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value          # once: later uses are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
