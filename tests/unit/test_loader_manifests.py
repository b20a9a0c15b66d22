"""Manifests (`netemu apply -f`, topology workloads, objects built in code):
conversion of old apiVersions, Kubernetes' defaults, and each class of bad input."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import yaml

from netemu.topology.manifests import load_manifests, validate_objects
from netemu.topology.model import ClusterSettings, NodeSpec, TopologyError

DATA = Path(__file__).parent / "data"


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load(tmp_path: Path, text: str, settings: ClusterSettings | None = None):
    return load_manifests(write(tmp_path, text), settings)


def load_one(tmp_path: Path, text: str) -> dict:
    objects, _ = load(tmp_path, text)
    assert len(objects) == 1
    return objects[0]


def error(tmp_path: Path, text: str, settings: ClusterSettings | None = None) -> str:
    with pytest.raises(TopologyError) as info:
        load(tmp_path, text, settings)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def pod(name: str = "p", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "nginx"}], **spec}}


def service(name: str = "s", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], **spec}}


def controller(kind: str, api_version: str, name: str = "c", selector=None, labels=None,
               **spec) -> dict:
    labels = {"app": "web"} if labels is None else labels
    obj = {"apiVersion": api_version, "kind": kind, "metadata": {"name": name},
           "spec": {"template": {"metadata": {"labels": labels},
                                 "spec": {"containers": [{"name": "c", "image": "nginx"}]}},
                    **spec}}
    if selector is not None:
        obj["spec"]["selector"] = selector
    return obj


def dump(*objects: dict) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def settings_with(**kw) -> ClusterSettings:
    s = ClusterSettings()
    for k, v in kw.items():
        setattr(s, k, v)
    return s


# --- the tutorial's manifests load as printed ---------------------------------

def test_tutorial_pod_manifest_loads_unchanged():
    text = (DATA / "nginxpod.yaml").read_text()
    objects, warnings = load_manifests(DATA / "nginxpod.yaml")
    assert (DATA / "nginxpod.yaml").read_text() == text          # never rewritten
    assert warnings == []
    [p] = objects
    assert (p["apiVersion"], p["kind"], p["metadata"]) == ("v1", "Pod", {"name": "nginxpod", "namespace": "default"})
    assert [c["ports"] for c in p["spec"]["containers"]] == [
        [{"containerPort": 80, "hostPort": 80, "protocol": "TCP"}],
        [{"containerPort": 8800, "hostPort": 8800, "protocol": "TCP"}]]
    assert p["spec"]["restartPolicy"] == "Always"


def test_tutorial_replication_controller_loads_unchanged():
    objects, warnings = load_manifests(DATA / "nginx-rc.yaml")
    assert warnings == []
    [rc] = objects
    assert rc["metadata"] == {"name": "podtoservcie", "namespace": "default", "labels": {"app": "nginx"}}
    assert rc["spec"]["replicas"] == 2 and rc["spec"]["selector"] == {"app": "nginx"}
    template = rc["spec"]["template"]
    assert template["spec"]["restartPolicy"] == "Always"
    assert template["spec"]["containers"][0]["ports"] == [{"containerPort": 80, "protocol": "TCP"}]


def test_tutorial_job_loads_converted_to_batch_v1():
    objects, warnings = load_manifests(DATA / "job-dpkg.yaml")
    [job] = objects
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["manualSelector"] is True
    assert spec["selector"] == {"matchLabels": {"image": "ubuntu", "test": "dpkg"}}
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 6)
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert warnings == [f"{DATA / 'job-dpkg.yaml'}: document 1 (Job package-check): apiVersion: "
                        "extensions/v1beta1 Job converted to batch/v1, as the API server does"]


def test_directory_multi_document_and_list(tmp_path):
    write(tmp_path, dump(pod("a"), service("s")), "one.yaml")
    write(tmp_path, dump({"apiVersion": "v1", "kind": "List", "items": [pod("b"), pod("c")]}), "two.yml")
    write(tmp_path, "not: a manifest", "notes.txt")
    objects, _ = load_manifests(tmp_path)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Pod", "a"), ("Service", "s"), ("Pod", "b"), ("Pod", "c")]


# --- defaults ----------------------------------------------------------------------

def test_pod_defaults(tmp_path):
    p = load_one(tmp_path, dump({**pod(), "spec": {"containers": [
        {"name": "c", "image": "nginx", "ports": [{"containerPort": 80}, {"containerPort": 53, "protocol": "UDP"}]}]}}))
    assert p["metadata"]["namespace"] == "default"
    assert p["spec"]["restartPolicy"] == "Always"
    assert [port["protocol"] for port in p["spec"]["containers"][0]["ports"]] == ["TCP", "UDP"]


def test_pod_keeps_given_namespace_and_restart_policy(tmp_path):
    p = load_one(tmp_path, dump({**pod(restartPolicy="Never"), "metadata": {"name": "p", "namespace": "kube-system"}}))
    assert p["metadata"]["namespace"] == "kube-system" and p["spec"]["restartPolicy"] == "Never"


def test_service_defaults(tmp_path):
    s = load_one(tmp_path, dump(service()))
    assert s["metadata"]["namespace"] == "default"
    assert s["spec"]["type"] == "ClusterIP"
    assert s["spec"]["sessionAffinity"] == "None"
    assert s["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert "externalTrafficPolicy" not in s["spec"]      # ClusterIP services have none


@pytest.mark.parametrize("stype", ["NodePort", "LoadBalancer"])
def test_external_traffic_policy_defaults_to_cluster(tmp_path, stype):
    assert load_one(tmp_path, dump(service(type=stype)))["spec"]["externalTrafficPolicy"] == "Cluster"
    local = load_one(tmp_path, dump(service(type=stype, externalTrafficPolicy="Local")))
    assert local["spec"]["externalTrafficPolicy"] == "Local"


def test_client_ip_affinity_timeout_defaults_to_three_hours(tmp_path):
    s = load_one(tmp_path, dump(service(sessionAffinity="ClientIP")))
    assert s["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}


def test_named_target_port_is_kept(tmp_path):
    s = load_one(tmp_path, dump(service(ports=[{"port": 80, "targetPort": "http"}])))
    assert s["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("kind, api_version", [
    ("ReplicationController", "v1"), ("ReplicaSet", "apps/v1"), ("Deployment", "apps/v1")])
def test_replicas_default_to_one(tmp_path, kind, api_version):
    selector = {"app": "web"} if kind == "ReplicationController" else {"matchLabels": {"app": "web"}}
    obj = load_one(tmp_path, dump(controller(kind, api_version, selector=selector)))
    assert obj["spec"]["replicas"] == 1
    assert obj["spec"]["template"]["spec"]["restartPolicy"] == "Always"


def test_job_defaults(tmp_path):
    job = controller("Job", "batch/v1")
    job["spec"]["template"]["spec"]["restartPolicy"] = "OnFailure"
    obj = load_one(tmp_path, dump(job))
    assert (obj["spec"]["completions"], obj["spec"]["parallelism"], obj["spec"]["backoffLimit"]) == (1, 1, 6)
    assert "selector" not in obj["spec"]       # generated from the uid at creation, as Kubernetes does


def test_rc_selector_and_labels_default_to_template_labels(tmp_path):
    rc = load_one(tmp_path, dump(controller("ReplicationController", "v1", labels={"app": "web", "tier": "x"})))
    assert rc["spec"]["selector"] == {"app": "web", "tier": "x"}
    assert rc["metadata"]["labels"] == {"app": "web", "tier": "x"}


def test_input_objects_are_not_modified(tmp_path):
    objects = [pod(), service()]
    before = copy.deepcopy(objects)
    validate_objects(objects, None, None, "expose")
    assert objects == before


# --- old apiVersions ----------------------------------------------------------------

@pytest.mark.parametrize("kind, api_version", [
    ("Deployment", "extensions/v1beta1"), ("Deployment", "apps/v1beta1"), ("Deployment", "apps/v1beta2"),
    ("ReplicaSet", "extensions/v1beta1"), ("ReplicaSet", "apps/v1beta2"),
    ("DaemonSet", "extensions/v1beta1"), ("DaemonSet", "apps/v1beta2"),
])
def test_old_api_versions_convert_to_apps_v1(tmp_path, kind, api_version):
    objects, warnings = load(tmp_path, dump(controller(kind, api_version, selector={"matchLabels": {"app": "web"}})))
    assert objects[0]["apiVersion"] == "apps/v1"
    assert any(f"{api_version} {kind} converted to apps/v1" in w for w in warnings)


@pytest.mark.parametrize("kind, api_version", [
    ("Deployment", "extensions/v1beta1"), ("Deployment", "apps/v1beta1"), ("DaemonSet", "extensions/v1beta1")])
def test_old_versions_default_the_selector_from_template_labels(tmp_path, kind, api_version):
    obj = load_one(tmp_path, dump(controller(kind, api_version)))
    assert obj["spec"]["selector"] == {"matchLabels": {"app": "web"}}
    assert obj["metadata"]["labels"] == {"app": "web"}


def test_apps_v1beta2_requires_a_selector_like_apps_v1(tmp_path):
    msg = error(tmp_path, dump(controller("Deployment", "apps/v1beta2")))
    assert msg.endswith("document 1 (Deployment c): spec.selector: Required value")


def test_extensions_job_with_selector_gets_manual_selector(tmp_path):
    job = controller("Job", "extensions/v1beta1", selector={"matchLabels": {"app": "web"}})
    job["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    obj = load_one(tmp_path, dump(job))
    assert obj["apiVersion"] == "batch/v1" and obj["spec"]["manualSelector"] is True
    del job["spec"]["selector"]
    assert "manualSelector" not in load_one(tmp_path, dump(job))["spec"]


def test_batch_v1_job_selector_without_manual_selector_is_refused(tmp_path):
    job = controller("Job", "batch/v1", selector={"matchLabels": {"app": "web"}})
    job["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    assert "spec.selector: Invalid value" in error(tmp_path, dump(job))


# --- Kubernetes' validation wording -------------------------------------------------

def test_job_restart_policy_always_is_unsupported(tmp_path):
    job = controller("Job", "batch/v1")
    job["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    p = write(tmp_path, dump(job))
    with pytest.raises(TopologyError) as info:
        load_manifests(p)
    assert str(info.value) == (f'{p}: document 1 (Job c): spec.template.spec.restartPolicy: Unsupported value: '
                               '"Always": supported values: "OnFailure", "Never"')


def test_job_restart_policy_missing_is_required(tmp_path):
    msg = error(tmp_path, dump(controller("Job", "batch/v1")))
    assert "document 1 (Job c): spec.template.spec.restartPolicy: Required value" in msg


@pytest.mark.parametrize("kind", ["Deployment", "ReplicaSet", "DaemonSet"])
def test_selector_must_match_template_labels(tmp_path, kind):
    obj = controller(kind, "apps/v1", labels={"app": "x"}, selector={"matchLabels": {"app": "y"}})
    msg = error(tmp_path, dump(obj))
    assert msg.endswith(f'document 1 ({kind} c): spec.template.metadata.labels: Invalid value: '
                        'map[string]string{"app":"x"}: selector does not match template labels')


def test_rc_selector_must_match_template_labels(tmp_path):
    msg = error(tmp_path, dump(controller("ReplicationController", "v1", selector={"app": "y"})))
    assert "spec.template.metadata.labels: Invalid value: map[string]string{\"app\":\"web\"}: selector does not" in msg


def test_apps_v1_requires_a_selector(tmp_path):
    assert error(tmp_path, dump(controller("ReplicaSet", "apps/v1"))).endswith("spec.selector: Required value")


@pytest.mark.parametrize("kind, api_version", [("Deployment", "apps/v1"), ("ReplicationController", "v1")])
def test_negative_replicas(tmp_path, kind, api_version):
    selector = {"app": "web"} if kind == "ReplicationController" else {"matchLabels": {"app": "web"}}
    msg = error(tmp_path, dump(controller(kind, api_version, selector=selector, replicas=-1)))
    assert msg.endswith(f"({kind} c): spec.replicas: Invalid value: -1: must be greater than or equal to 0")


def test_unknown_fields_warn_and_are_dropped(tmp_path):
    obj = pod()
    obj["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    obj["spec"]["restartPolicyy"] = "Never"
    obj["extra"] = 1
    objects, warnings = load(tmp_path, dump(obj))
    container = objects[0]["spec"]["containers"][0]
    assert "imagePullPolicyy" not in container and "restartPolicyy" not in objects[0]["spec"]
    assert "extra" not in objects[0]
    assert objects[0]["spec"]["restartPolicy"] == "Always"
    assert len(warnings) == 3
    assert any('spec.containers[0].imagePullPolicyy: unknown field (Kubernetes Container has no such field); '
               'did you mean "imagePullPolicy"?' in w for w in warnings)
    assert any(": extra: unknown field" in w for w in warnings)


def test_known_but_unused_fields_warn_and_are_kept(tmp_path):
    obj = pod()
    obj["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    objects, warnings = load(tmp_path, dump(obj))
    assert objects[0]["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    assert any("imagePullPolicy: field is not used by netemu" in w for w in warnings)


def test_unknown_kind(tmp_path):
    msg = error(tmp_path, dump({**pod(), "kind": "Pods"}))
    assert 'document 1 (Pods p): kind: unknown kind "Pods" (supported kinds: Pod, ReplicationController' in msg
    assert "StatefulSet is not supported by netemu" in error(tmp_path, dump({**pod(), "kind": "StatefulSet"}))


@pytest.mark.parametrize("kind, api_version", [("Pod", "apps/v1"), ("ReplicaSet", "apps/v1beta1"),
                                               ("Job", "batch/v2"), ("Deployment", "v1")])
def test_unknown_api_version_for_kind(tmp_path, kind, api_version):
    msg = error(tmp_path, dump({**pod(), "kind": kind, "apiVersion": api_version}))
    assert f'apiVersion: no kind "{kind}" is registered for version "{api_version}"' in msg


@pytest.mark.parametrize("obj, where, expected", [
    (controller("ReplicationController", "v1", replicas="2"), "spec.replicas", 'must be an integer, got string "2"'),
    ({**pod(), "metadata": {"name": "p", "labels": {"version": 1}}}, "metadata.labels.version",
     "must be a string, got integer 1 (quote it)"),
    ({**pod(), "spec": {"containers": {"name": "c"}}}, "spec.containers", "must be a list"),
    ({**pod(), "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": "80"}]}]}},
     "spec.containers[0].ports[0].containerPort", 'must be an integer, got string "80"'),
    (service(ports=[{"port": 80, "targetPort": True}]), "spec.ports[0].targetPort", "must be an integer or a string"),
])
def test_wrong_field_types(tmp_path, obj, where, expected):
    msg = error(tmp_path, dump(obj))
    assert f": {where}: {expected}" in msg


def test_malformed_manifest_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [p\n")
    with pytest.raises(TopologyError) as info:
        load_manifests(p)
    assert str(info.value).startswith(f"{p}: line ") and "invalid YAML" in str(info.value)


def test_duplicate_objects(tmp_path):
    msg = error(tmp_path, dump(pod("a"), service("a"), pod("a")))
    assert 'document 3 (Pod a): metadata.name: duplicate Pod "default/a" (first defined in' in msg
    # same name in another namespace or of another kind is fine
    other_ns = {**pod("a"), "metadata": {"name": "a", "namespace": "kube-system"}}
    assert len(load(tmp_path, dump(pod("a"), service("a"), other_ns))[0]) == 3


def test_container_port_out_of_range_names_document(tmp_path):
    rc = yaml.safe_load((DATA / "nginx-rc.yaml").read_text())
    rc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
    p = write(tmp_path, dump(pod("first"), rc), "nginx-rc.yaml")
    with pytest.raises(TopologyError) as info:
        load_manifests(p)
    assert str(info.value) == (f"{p}: document 2 (ReplicationController podtoservcie): "
                               "spec.template.spec.containers[0].ports[0].containerPort: "
                               "must be between 1 and 65535, got 70000")


@pytest.mark.parametrize("obj, where, low", [
    (service(ports=[{"port": 0}]), "spec.ports[0].port", 1),
    (service(ports=[{"port": 80, "targetPort": 65536}]), "spec.ports[0].targetPort", 1),
    (service(type="NodePort", ports=[{"port": 80, "nodePort": 70000}]), "spec.ports[0].nodePort", 1),
    ({**pod(), "spec": {"containers": [{"name": "c", "image": "x",
                                        "ports": [{"containerPort": 80, "hostPort": 65536}]}]}},
     "spec.containers[0].ports[0].hostPort", 0),     # 0 means "not published"
])
def test_ports_out_of_range(tmp_path, obj, where, low):
    assert f": {where}: must be between {low} and 65535, got " in error(tmp_path, dump(obj))


def test_node_port_outside_default_range_without_settings(tmp_path):
    msg = error(tmp_path, dump(service(type="NodePort", ports=[{"port": 80, "nodePort": 8080}])))
    assert msg.endswith("spec.ports[0].nodePort: Invalid value: 8080: provided port is not in the valid range. "
                        "The range of valid ports is 30000-32767")


def test_node_port_range_from_settings(tmp_path):
    text = dump(service(type="NodePort", ports=[{"port": 80, "nodePort": 8080}]))
    objects, _ = load(tmp_path, text, settings_with(node_port_range=(8000, 8999)))
    assert objects[0]["spec"]["ports"][0]["nodePort"] == 8080
    assert "The range of valid ports is 31000-31999" in error(
        tmp_path, text, settings_with(node_port_range=(31000, 31999)))


def test_node_port_only_for_node_port_and_load_balancer(tmp_path):
    msg = error(tmp_path, dump(service(ports=[{"port": 80, "nodePort": 30080}])))
    assert msg.endswith("spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'")
    load(tmp_path, dump(service(type="LoadBalancer", ports=[{"port": 80, "nodePort": 30080}])))


def test_node_port_used_by_two_services(tmp_path):
    a = service("a", type="NodePort", ports=[{"port": 80, "nodePort": 30080}])
    b = service("b", type="NodePort", ports=[{"port": 81, "nodePort": 30080}])
    assert "provided port is already allocated (to document 1 (Service a))" in error(tmp_path, dump(a, b))


@pytest.mark.parametrize("timeout, ok", [(0, False), (1, True), (86400, True), (86401, False)])
def test_session_affinity_timeout_range(tmp_path, timeout, ok):
    obj = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}})
    if ok:
        load(tmp_path, dump(obj))
    else:
        assert ("spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be between 1 and 86400, "
                f"got {timeout}") in error(tmp_path, dump(obj))


def test_session_affinity_config_needs_client_ip_affinity(tmp_path):
    obj = service(sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}})
    assert "spec.sessionAffinityConfig: Forbidden" in error(tmp_path, dump(obj))


@pytest.mark.parametrize("name, problem", [
    ("http_port", "alpha-numeric"), ("a--b", "consecutive hyphens"), ("8080", "at least one letter"),
    ("a-very-long-port-name", "no more than 15 characters")])
def test_named_target_port_must_be_iana_svc_name(tmp_path, name, problem):
    msg = error(tmp_path, dump(service(ports=[{"port": 80, "targetPort": name}])))
    assert f'spec.ports[0].targetPort: Invalid value: "{name}": ' in msg and problem in msg


def test_external_traffic_policy_values(tmp_path):
    assert 'spec.externalTrafficPolicy: Unsupported value: "Remote": supported values: "Cluster", "Local"' in error(
        tmp_path, dump(service(type="NodePort", externalTrafficPolicy="Remote")))
    assert "may only be set for externally-accessible services" in error(
        tmp_path, dump(service(externalTrafficPolicy="Local")))


def test_unknown_service_type(tmp_path):
    assert 'spec.type: Unsupported value: "Nodeport"' in error(tmp_path, dump(service(type="Nodeport")))


def test_host_port_twice_in_one_pod(tmp_path):
    obj = pod()
    obj["spec"]["containers"] = [
        {"name": "a", "image": "x", "ports": [{"containerPort": 80, "hostPort": 8080}]},
        {"name": "b", "image": "x", "ports": [{"containerPort": 81, "hostPort": 8080}]}]
    msg = error(tmp_path, dump(obj))
    assert 'spec.containers[1].ports[0].hostPort: Duplicate value: "8080/TCP"' in msg
    obj["spec"]["containers"][1]["ports"][0]["protocol"] = "UDP"      # another protocol: fine
    load(tmp_path, dump(obj))


def test_host_port_twice_on_one_node_via_validate_objects():
    nodes = [NodeSpec("n1", {}, None, None), NodeSpec("n2", {}, None, None)]
    ports = [{"name": "c", "image": "x", "ports": [{"containerPort": 80, "hostPort": 80}]}]
    a = pod("a", nodeName="n1")
    a["spec"]["containers"] = ports
    b = copy.deepcopy(a)
    b["metadata"]["name"] = "b"
    with pytest.raises(TopologyError) as info:
        validate_objects([a, b], ClusterSettings(), nodes, "cli")
    assert str(info.value) == ('cli: object 2 (Pod b): spec.containers[0].ports[0].hostPort: hostPort 80/TCP '
                               'on node "n1" is already used by object 1 (Pod a)')
    b["spec"]["nodeName"] = "n2"
    assert validate_objects([a, b], ClusterSettings(), nodes, "cli") == []


def test_validate_objects_on_objects_built_in_code():
    expose = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
              "spec": {"type": "NodePort", "selector": {"app": "web"},
                       "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}}
    assert validate_objects([expose], ClusterSettings(), None, "netemu expose") == []
    bad = copy.deepcopy(expose)
    bad["spec"]["ports"][0]["nodePort"] = 29999
    with pytest.raises(TopologyError, match=r"^netemu expose: object 1 \(Service web\): spec.ports\[0\].nodePort"):
        validate_objects([bad], ClusterSettings(), None, "netemu expose")


def test_loaded_objects_validate_again_unchanged(tmp_path):
    objects, _ = load_manifests(DATA / "job-dpkg.yaml")
    before = copy.deepcopy(objects)
    validate_objects(objects, ClusterSettings(), None, "again")
    assert objects == before
