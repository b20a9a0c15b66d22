"""Which manifest fields netemu reads, and which others Kubernetes knows.

Each struct lists the fields netemu uses, with their types (checked on the way
in), and the remaining field names of the same Kubernetes struct (taken from the
Kubernetes 1.37 OpenAPI schema, as shipped by the kubernetes-validate package).
A field in the second list is kept in the object but gets a warning ("not used
by netemu"); a field in neither gets an "unknown field" warning and is dropped,
as the API server does with fieldValidation=Warn (a typo is reported, the
object still loads). Fields below a known-but-unused field are not looked at.

Type notation: "string", "integer" (int32, as nearly every Kubernetes number),
"int64", "boolean", "number", "map[string]string", "[]string", "int-or-string", a
struct name, or ("list", struct name). A field netemu reads anywhere (a
controller, the proxy, the scheduler) is a used field, so that its type is
checked before that code sees it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Struct:
    name: str                       # the Kubernetes type name, for messages
    used: dict                      # field -> type
    unused: frozenset[str]          # fields Kubernetes accepts that netemu ignores


def _s(name: str, used: dict, unused: str = "") -> Struct:
    return Struct(name, used, frozenset(unused.split()))


# Fields the API server sets itself: a manifest may carry them (copied from
# `kubectl get -o yaml`), the loader drops them with a warning.
SERVER_SET_METADATA = frozenset(
    "uid resourceVersion creationTimestamp generation selfLink managedFields "
    "deletionTimestamp deletionGracePeriodSeconds".split())

STRUCTS: dict[str, Struct] = {s.name: s for s in [
    _s("ObjectMeta",
       {"name": "string", "namespace": "string", "labels": "map[string]string",
        "annotations": "map[string]string"},
       "generateName finalizers ownerReferences " + " ".join(SERVER_SET_METADATA)),
    _s("LabelSelector",
       {"matchLabels": "map[string]string", "matchExpressions": ("list", "LabelSelectorRequirement")}),
    _s("LabelSelectorRequirement",
       {"key": "string", "operator": "string", "values": "[]string"}),
    _s("PodTemplateSpec", {"metadata": "ObjectMeta", "spec": "PodSpec"}),
    _s("PodSpec",
       {"containers": ("list", "Container"), "restartPolicy": "string",
        "nodeName": "string", "nodeSelector": "map[string]string", "affinity": "Affinity",
        "terminationGracePeriodSeconds": "int64"},
       "activeDeadlineSeconds automountServiceAccountToken dnsConfig dnsPolicy "
       "enableServiceLinks ephemeralContainers evictionResponders hostAliases hostIPC "
       "hostNetwork hostPID hostUsers hostname hostnameOverride imagePullSecrets "
       "initContainers os overhead preemptionPolicy priority priorityClassName "
       "readinessGates resourceClaims resources runtimeClassName schedulerName "
       "schedulingGates schedulingGroup securityContext serviceAccount serviceAccountName "
       "setHostnameAsFQDN shareProcessNamespace subdomain "
       "tolerations topologySpreadConstraints volumes"),
    _s("Affinity", {"nodeAffinity": "NodeAffinity"}, "podAffinity podAntiAffinity"),
    _s("NodeAffinity", {"requiredDuringSchedulingIgnoredDuringExecution": "NodeSelector"},
       "preferredDuringSchedulingIgnoredDuringExecution"),
    _s("NodeSelector", {"nodeSelectorTerms": ("list", "NodeSelectorTerm")}),
    _s("NodeSelectorTerm", {"matchExpressions": ("list", "NodeSelectorRequirement"),
                            "matchFields": ("list", "NodeSelectorRequirement")}),
    _s("NodeSelectorRequirement", {"key": "string", "operator": "string", "values": "[]string"}),
    _s("Container",
       {"name": "string", "image": "string", "command": "[]string", "args": "[]string",
        "env": ("list", "EnvVar"), "ports": ("list", "ContainerPort"), "workingDir": "string",
        "livenessProbe": "Probe", "readinessProbe": "Probe", "startupProbe": "Probe",
        # stdin: a FIFO the kubelet keeps for `kubectl attach -i`; tty is
        # kept but not given (attach -t is refused).
        "stdin": "boolean", "stdinOnce": "boolean"},
       "envFrom imagePullPolicy lifecycle resizePolicy "
       "resources restartPolicy restartPolicyRules securityContext "
       "terminationMessagePath terminationMessagePolicy tty volumeDevices volumeMounts"),
    _s("EnvVar", {"name": "string", "value": "string"}, "valueFrom"),
    # Probes: run by the kubelet (netemu.node.probes); grpc is not emulated.
    _s("Probe",
       {"exec": "ExecAction", "httpGet": "HTTPGetAction", "tcpSocket": "TCPSocketAction",
        "initialDelaySeconds": "integer", "periodSeconds": "integer", "timeoutSeconds": "integer",
        "successThreshold": "integer", "failureThreshold": "integer"},
       "grpc terminationGracePeriodSeconds"),
    _s("ExecAction", {"command": "[]string"}),
    _s("HTTPGetAction",
       {"path": "string", "port": "int-or-string", "host": "string", "scheme": "string",
        "httpHeaders": ("list", "HTTPHeader")}),
    _s("HTTPHeader", {"name": "string", "value": "string"}),
    _s("TCPSocketAction", {"port": "int-or-string", "host": "string"}),
    _s("ContainerPort",
       {"containerPort": "integer", "hostPort": "integer", "protocol": "string",
        "name": "string", "hostIP": "string"}),
    _s("ReplicationControllerSpec",
       {"replicas": "integer", "selector": "map[string]string", "template": "PodTemplateSpec",
        "minReadySeconds": "integer"}),
    _s("ReplicaSetSpec",
       {"replicas": "integer", "selector": "LabelSelector", "template": "PodTemplateSpec",
        "minReadySeconds": "integer"}),
    _s("DeploymentSpec",
       {"replicas": "integer", "selector": "LabelSelector", "template": "PodTemplateSpec",
        "minReadySeconds": "integer", "paused": "boolean", "strategy": "DeploymentStrategy"},
       "progressDeadlineSeconds revisionHistoryLimit"),
    _s("DeploymentStrategy", {"type": "string", "rollingUpdate": "RollingUpdateDeployment"}),
    _s("RollingUpdateDeployment", {"maxUnavailable": "int-or-string", "maxSurge": "int-or-string"}),
    _s("DaemonSetSpec",
       {"selector": "LabelSelector", "template": "PodTemplateSpec", "minReadySeconds": "integer",
        "updateStrategy": "DaemonSetUpdateStrategy"},
       "revisionHistoryLimit"),
    _s("DaemonSetUpdateStrategy", {"type": "string", "rollingUpdate": "RollingUpdateDaemonSet"}),
    _s("RollingUpdateDaemonSet", {"maxUnavailable": "int-or-string", "maxSurge": "int-or-string"}),
    _s("JobSpec",
       {"completions": "integer", "parallelism": "integer", "backoffLimit": "integer",
        "selector": "LabelSelector", "manualSelector": "boolean", "template": "PodTemplateSpec",
        "activeDeadlineSeconds": "int64", "suspend": "boolean", "ttlSecondsAfterFinished": "integer"},
       "backoffLimitPerIndex completionMode managedBy maxFailedIndexes "
       "podFailurePolicy podReplacementPolicy scheduling successPolicy"),
    _s("ServiceSpec",
       {"type": "string", "selector": "map[string]string", "ports": ("list", "ServicePort"),
        "clusterIP": "string", "sessionAffinity": "string",
        "sessionAffinityConfig": "SessionAffinityConfig", "loadBalancerIP": "string",
        "externalTrafficPolicy": "string", "externalIPs": "[]string",
        "publishNotReadyAddresses": "boolean"},
       "allocateLoadBalancerNodePorts clusterIPs externalName "
       "healthCheckNodePort internalTrafficPolicy ipFamilies "
       "ipFamilyPolicy loadBalancerClass loadBalancerSourceRanges "
       "trafficDistribution"),
    _s("SessionAffinityConfig", {"clientIP": "ClientIPConfig"}),
    _s("ClientIPConfig", {"timeoutSeconds": "integer"}),
    _s("ServicePort",
       {"name": "string", "port": "integer", "targetPort": "int-or-string",
        "protocol": "string", "nodePort": "integer"},
       "appProtocol"),
    _s("NamespaceSpec", {}, "finalizers"),
]}

# The kinds a manifest may hold -> the struct their spec is decoded as, in the
# order error messages list them. Every kind has apiVersion, kind, metadata,
# spec and status at the top; status is dropped on the way in (the cluster
# writes it). Scope and apiVersions (current and old): netemu.k8s.kinds.
SPEC_STRUCTS: dict[str, str] = {
    "Pod": "PodSpec",
    "ReplicationController": "ReplicationControllerSpec",
    "ReplicaSet": "ReplicaSetSpec",
    "Deployment": "DeploymentSpec",
    "DaemonSet": "DaemonSetSpec",
    "Job": "JobSpec",
    "Service": "ServiceSpec",
    "Namespace": "NamespaceSpec",
}

# Kinds Kubernetes has that netemu does not emulate, so the error can say so
# instead of "unknown kind".
KNOWN_UNSUPPORTED_KINDS = frozenset(
    "StatefulSet CronJob ConfigMap Secret Ingress IngressClass NetworkPolicy Endpoints "
    "EndpointSlice PersistentVolume PersistentVolumeClaim StorageClass ServiceAccount "
    "Role RoleBinding ClusterRole ClusterRoleBinding HorizontalPodAutoscaler "
    "PodDisruptionBudget LimitRange ResourceQuota PodTemplate Node Event "
    "CustomResourceDefinition PriorityClass RuntimeClass".split())
