"""How far a node's data path has caught up with the store, for `up` to wait on.

Each part of an agent that turns store objects into kernel state (the overlay:
subnet leases into routes, neighbours or the udp workers' peer table; the
proxy: Services and Endpoints into rules) writes, after it has put them in
place, the store revision it has applied for each prefix it watches:
<node folder>/<part>-synced.json, {"<prefix>": revision}. A part that has
applied revision R of a prefix holds every object under it whose
mod_revision is at most R. `netemu up` waits until every node's parts hold the
newest object of each prefix (cluster.wait_ready), so that a ping or a curl
right after `up` finds its route and its rule.
"""

from __future__ import annotations

import json
import os

from netemu import names


def path(cluster: str, node: str, part: str) -> str:
    return os.path.join(names.node_dir(cluster, node), f"{part}-synced.json")


def mark(cluster: str, node: str, part: str, revisions: dict[str, int]) -> None:
    """Say that PART of NODE has applied REVISIONS ({prefix: revision})."""
    target = path(cluster, node, part)
    tmp = target + ".tmp"
    with open(tmp, "w") as f:
        json.dump(revisions, f)
    os.replace(tmp, target)


def read(cluster: str, node: str, part: str) -> dict[str, int]:
    """What PART of NODE has said it applied ({} before it said anything)."""
    try:
        with open(path(cluster, node, part)) as f:
            data = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lagging(cluster: str, node: str, wanted: dict[str, dict[str, int]]) -> list[str]:
    """The parts of NODE that have not applied WANTED ({part: {prefix:
    revision}}) yet, as 'part' names."""
    late = []
    for part, revisions in wanted.items():
        have = read(cluster, node, part)
        if any(not isinstance(have.get(prefix), int) or have[prefix] < rev for prefix, rev in revisions.items()):
            late.append(part)
    return late
