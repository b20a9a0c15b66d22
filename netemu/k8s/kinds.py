"""The kinds netemu knows: THE table of them, read by every other module.

One Kind per stored kind: its resource (the plural in URLs and in kubectl's
errors), singular name, short names (kubectl resolves `po`, `svc`, `rc` from
discovery; netemu's CLI from ALIASES), group/version (the one objects are
stored in), scope, categories (`kubectl get all`), for the scalable kinds the
spec field the /scale subresource reads and writes, and the path of its objects
in the store (registry.key). The store, the API server, the loader and the CLI
all read this table; a new kind is one line here (tests/unit/test_kinds.py
checks that no other module keeps a table of its own).

A kind may be served under more than one group/version: the tutorial's era
served DaemonSets, Deployments, ReplicaSets and Jobs under extensions/v1beta1.
They are stored in their current version (group/version here) and shown in the
version the client asked for; the loader accepts the old apiVersions a kind
once had (old_versions) and converts them on the way in
(topology.manifests._convert_old).
"""

from __future__ import annotations

import dataclasses

# What a client may do with every resource served here (kubectl reads verbs to
# decide what to try); deletecollection too, but for namespaces, as Kubernetes.
VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
READ_VERBS = ("get", "list", "watch")
NO_DELETE_COLLECTION = ("Namespace",)


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
    # The store's path for the kind's objects, /registry/<path>/...: the
    # resource, except where kube-apiserver's registry keeps its own old names.
    registry_path: str = ""
    # apiVersions a manifest may still use, converted to group_version on the
    # way in (those the API server once served for the kind, 1.2-1.15).
    old_versions: tuple[str, ...] = ()
    # Owns pods through a pod template (spec.template): its pods go with it.
    workload: bool = False
    # Served for reading only (READ_VERBS): netemu writes these objects itself.
    read_only: bool = False

    @property
    def verbs(self) -> tuple[str, ...]:
        if self.read_only:
            return READ_VERBS
        return tuple(sorted(VERBS + (() if self.kind in NO_DELETE_COLLECTION else ("deletecollection",))))

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def accepted_versions(self) -> tuple[str, ...]:
        """The apiVersions a manifest of this kind may give, current first."""
        return (self.group_version,) + self.old_versions

    @property
    def path(self) -> str:
        return self.registry_path or self.resource

    def qualified(self, group: str | None = None) -> str:
        """The resource as errors name it: pods, jobs.batch, daemonsets.extensions."""
        group = self.group if group is None else group
        return f"{self.resource}.{group}" if group else self.resource

    @property
    def words(self) -> tuple[str, ...]:
        """The words a command line names the kind by: pod, po, pods."""
        return tuple(dict.fromkeys((self.singular,) + self.short_names + (self.resource,)))

    @property
    def word(self) -> str:
        """The kind as kubectl's verbs print it: pod, deployment.apps, job.batch."""
        return f"{self.singular}.{self.group}" if self.group else self.singular

    def ref(self, name: str) -> str:
        """pod/x, deployment.apps/x, job.batch/x."""
        return f"{self.word}/{name}"


_POD_FIELDS = ("spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
               "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName")
_EVENT_FIELDS = ("involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                 "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                 "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type")

_OLD_APPS = ("apps/v1beta2", "extensions/v1beta1")   # apps/v1beta1 never had ReplicaSet or DaemonSet

# In the order registry.KINDS had (controllers/namespace.py empties a namespace in it;
# discovery lists kinds in SERVED's order, not this one).
KINDS: tuple[Kind, ...] = (
    Kind("Pod", "pods", "pod", ("po",), "", "v1", True, ("all",), fields=_POD_FIELDS),
    Kind("Service", "services", "service", ("svc",), "", "v1", True, ("all",), registry_path="services/specs"),
    Kind("Endpoints", "endpoints", "endpoints", ("ep",), "", "v1", True, registry_path="services/endpoints"),
    Kind("ReplicationController", "replicationcontrollers", "replicationcontroller", ("rc",), "", "v1",
         True, ("all",), "replicas", fields=("status.replicas",), registry_path="controllers", workload=True),
    Kind("ReplicaSet", "replicasets", "replicaset", ("rs",), "apps", "v1", True, ("all",), "replicas",
         fields=("status.replicas",), old_versions=_OLD_APPS, workload=True),
    Kind("Deployment", "deployments", "deployment", ("deploy",), "apps", "v1", True, ("all",), "replicas",
         old_versions=("apps/v1beta2", "apps/v1beta1", "extensions/v1beta1"), workload=True),
    Kind("DaemonSet", "daemonsets", "daemonset", ("ds",), "apps", "v1", True, ("all",),
         old_versions=_OLD_APPS, workload=True),
    Kind("Job", "jobs", "job", (), "batch", "v1", True, ("all",), fields=("status.successful",),
         old_versions=("extensions/v1beta1",), workload=True),
    Kind("Event", "events", "event", ("ev",), "", "v1", True, fields=_EVENT_FIELDS),
    Kind("EndpointSlice", "endpointslices", "endpointslice", (), "discovery.k8s.io", "v1", True,
         fields=("addressType",)),
    # Node heartbeats: one per node in namespace kube-node-lease, renewed by its kubelet.
    Kind("Lease", "leases", "lease", (), "coordination.k8s.io", "v1", True),
    # netemu's own, kube-system/netemu-cluster, holds the cluster's settings
    # (netemu.clusterconfig), as kubeadm keeps kube-system/kubeadm-config; other
    # ConfigMaps are the users'.
    Kind("ConfigMap", "configmaps", "configmap", ("cm",), "", "v1", True),
    Kind("Namespace", "namespaces", "namespace", ("ns",), "", "v1", False, fields=("status.phase",)),
    # The API server keeps nodes under "minions", a name from Kubernetes' first days.
    Kind("Node", "nodes", "node", ("no",), "", "v1", False, fields=("spec.unschedulable",),
         registry_path="minions"),
)

BY_KIND = {k.kind: k for k in KINDS}

# The words a command line may name a kind by: singular, plural, short names
# (`netemu get po`, `delete rc x`), as discovery gives them to kubectl.
ALIASES = {word: k.kind for k in KINDS for word in k.words}

# The kinds that own pods through a pod template, in the order of KINDS.
WORKLOADS: tuple[str, ...] = tuple(k.kind for k in KINDS if k.workload)

# The kinds with a /status subresource (their status is written apart from
# their spec, as kube-apiserver's status strategies do).
WITH_STATUS = frozenset(("Pod", "Service", "ReplicationController", "ReplicaSet", "Deployment", "DaemonSet",
                         "Job", "Namespace", "Node"))


def resolve(word: str) -> str:
    """The kind a CLI word names (Pod, pods, po, svc, rc, ...). Raises KeyError."""
    if word in BY_KIND:
        return word
    return ALIASES[word.lower()]


# Group/versions in the order /apis lists them. The order matters: a bare
# `kubectl get jobs` takes the first group that has jobs, so batch comes before
# extensions, as on a real server.
GROUP_VERSIONS: tuple[str, ...] = ("v1", "apps/v1", "batch/v1", "extensions/v1beta1", "discovery.k8s.io/v1",
                                   "coordination.k8s.io/v1")

# group/version -> kinds served there. extensions/v1beta1 is the tutorial's:
# DaemonSets, Deployments, ReplicaSets and Jobs, converted to their current versions.
SERVED: dict[str, tuple[str, ...]] = {
    "v1": ("Pod", "Service", "Endpoints", "Node", "Event", "ReplicationController", "Namespace", "ConfigMap"),
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
    """The apiVersion objects of KIND are kept in."""
    return BY_KIND[kind].group_version


def _check() -> None:
    # Caught at import, not at a request: every kind served is one of KINDS,
    # and no CLI word names two kinds.
    unknown = [k for kinds in SERVED.values() for k in kinds if k not in BY_KIND]
    assert not unknown, f"served kinds not in KINDS: {unknown}"
    words = [w for k in KINDS for w in k.words]
    assert len(words) == len(ALIASES), "a CLI word names two kinds"


_check()
