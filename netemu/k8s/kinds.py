"""The kinds netemu serves, as the API server's discovery documents name them.

One Kind per stored kind: its resource (the plural in URLs), singular name,
short names (kubectl resolves `po`, `svc`, `rc` from discovery, not from a table
of its own), group/version, scope, categories (`kubectl get all`) and, for the
scalable kinds, the spec field the /scale subresource reads and writes.

A kind may be served under more than one group/version: the tutorial's era
served DaemonSets, Deployments, ReplicaSets and Jobs under extensions/v1beta1.
They are stored in their current version (apps/v1, batch/v1: registry.KINDS
says which) and shown in the version the client asked for; the loader converts
old manifests on the way in (topology.manifests._convert_old).
"""

from __future__ import annotations

import dataclasses

from netemu.store import registry

# What a client may do with every resource served here. deletecollection is not
# served, so it is not advertised: kubectl reads verbs to decide what to try.
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")


@dataclasses.dataclass(frozen=True)
class Kind:
    kind: str                       # Pod
    resource: str                   # pods
    singular: str                   # pod
    short_names: tuple[str, ...]    # ("po",)
    group: str                      # "" for the core group
    version: str                    # v1
    namespaced: bool
    categories: tuple[str, ...] = ()
    scale_field: str | None = None  # spec field behind the /scale subresource
    # Fields a fieldSelector may name besides metadata.name and metadata.namespace
    # (the real server refuses others: "field label not supported").
    fields: tuple[str, ...] = ()

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def qualified(self, group: str | None = None) -> str:
        """The resource as errors name it: pods, jobs.batch, daemonsets.extensions."""
        group = self.group if group is None else group
        return f"{self.resource}.{group}" if group else self.resource


_POD_FIELDS = ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
               "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName")
_EVENT_FIELDS = ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                 "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                 "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type")

KINDS: tuple[Kind, ...] = (
    Kind("Pod", "pods", "pod", ("po",), "", "v1", True, ("all",), fields=_POD_FIELDS),
    Kind("Service", "services", "service", ("svc",), "", "v1", True, ("all",)),
    Kind("Endpoints", "endpoints", "endpoints", ("ep",), "", "v1", True),
    Kind("Node", "nodes", "node", ("no",), "", "v1", False, fields=("spec.unschedulable",)),
    Kind("Namespace", "namespaces", "namespace", ("ns",), "", "v1", False, fields=("status.phase",)),
    Kind("Event", "events", "event", ("ev",), "", "v1", True, fields=_EVENT_FIELDS),
    Kind("ReplicationController", "replicationcontrollers", "replicationcontroller", ("rc",), "", "v1",
         True, ("all",), "replicas", fields=("status.replicas",)),
    Kind("DaemonSet", "daemonsets", "daemonset", ("ds",), "apps", "v1", True, ("all",)),
    Kind("Deployment", "deployments", "deployment", ("deploy",), "apps", "v1", True, ("all",), "replicas"),
    Kind("ReplicaSet", "replicasets", "replicaset", ("rs",), "apps", "v1", True, ("all",), "replicas",
         fields=("status.replicas",)),
    Kind("Job", "jobs", "job", (), "batch", "v1", True, ("all",), fields=("status.successful",)),
    Kind("EndpointSlice", "endpointslices", "endpointslice", (), "discovery.k8s.io", "v1", True,
         fields=("addressType",)),
    Kind("Lease", "leases", "lease", (), "coordination.k8s.io", "v1", True),
)

BY_KIND = {k.kind: k for k in KINDS}

# Group/versions in the order /apis lists them. The order matters: a bare
# `kubectl get jobs` takes the first group that has jobs, so batch comes before
# extensions, as on a real server.
GROUP_VERSIONS: tuple[str, ...] = ("v1", "apps/v1", "batch/v1", "extensions/v1beta1", "discovery.k8s.io/v1",
                                   "coordination.k8s.io/v1")

# group/version -> kinds served there. extensions/v1beta1 is the tutorial's:
# DaemonSets, Deployments, ReplicaSets and Jobs, converted to their current versions.
SERVED: dict[str, tuple[str, ...]] = {
    "v1": ("Pod", "Service", "Endpoints", "Node", "Event", "ReplicationController", "Namespace"),
    "apps/v1": ("DaemonSet", "Deployment", "ReplicaSet"),
    "batch/v1": ("Job",),
    "extensions/v1beta1": ("DaemonSet", "Deployment", "ReplicaSet", "Job"),
    "discovery.k8s.io/v1": ("EndpointSlice",),
    "coordination.k8s.io/v1": ("Lease",),
}

def served(group_version: str) -> list[Kind]:
    return [BY_KIND[k] for k in SERVED.get(group_version, ())]


def lookup(group_version: str, resource: str) -> Kind | None:
    """The kind served at /apis/<group_version>/.../<resource>, or None."""
    for k in served(group_version):
        if k.resource == resource:
            return k
    return None


def stored_version(kind: str) -> str:
    """The apiVersion objects of KIND are kept in (registry.KINDS)."""
    return registry.KINDS[kind][2]


def _check() -> None:
    # Every kind served must be one the store keeps; caught at import, not at a request.
    missing = [k.kind for k in KINDS if k.kind not in registry.KINDS]
    assert not missing, f"kinds without a registry entry: {missing}"
    unserved = [k for k in registry.KINDS if k not in BY_KIND]
    assert not unserved, f"stored kinds this table does not know: {unserved}"
    for k in KINDS:
        assert stored_version(k.kind) == k.group_version, k


_check()
