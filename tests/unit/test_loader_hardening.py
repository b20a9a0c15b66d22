"""Hostile and careless input (issue 12, items 4, 5, 6, 11, 17): every refusal is
one line naming the file and the field, nothing blocks, nothing grows without
bound, and what Kubernetes refuses is refused with Kubernetes' words."""

from __future__ import annotations

import os
import random
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import yaml

from netemu import api, kubectl_verbs
from netemu.store import registry
from netemu.topology import names
from netemu.topology.loader import load_topology
from netemu.topology.manifests import load_manifests, validate_objects
from netemu.topology.model import TopologyError
from netemu.topology.yamlsource import MAX_FILE_BYTES, load_documents

from tests.unit.test_controllers_support import open_store, settings

pytestmark = pytest.mark.timeout(30)

TOPOLOGY = """\
name: t
nodes:
  - name: a
"""


def one_line_error(call, *args, **kw) -> str:
    """The TopologyError CALL raises: one line, at most a few hundred characters."""
    with pytest.raises(TopologyError) as info:
        call(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 1500, msg[:2000]
    return msg


def pod(**container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "busybox", **container}]}}


def controller(kind: str, **spec) -> dict:
    body = {"template": {"metadata": {"labels": {"app": "x"}},
                         "spec": {"containers": [{"name": "c", "image": "busybox"}],
                                  **({"restartPolicy": "Never"} if kind == "Job" else {})}}, **spec}
    if kind in ("ReplicaSet", "Deployment", "DaemonSet"):
        body.setdefault("selector", {"matchLabels": {"app": "x"}})
    version = {"ReplicationController": "v1", "Job": "batch/v1"}.get(kind, "apps/v1")
    return {"apiVersion": version, "kind": kind, "metadata": {"name": "w"}, "spec": body}


def service(**spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}], **spec}}


def refused(obj: dict) -> str:
    return one_line_error(validate_objects, [obj], None, None, "f.yaml")


# --- item 4: what would crash a kubelet is refused at admission -------------------

ENV_RULE = "a valid environment variable name must consist only of printable ASCII characters other than '='"


@pytest.mark.parametrize("bad", ["A=B", "=", "TAB\tX", "é", "NEW\nLINE"])
def test_env_var_names_follow_kubernetes_relaxed_rule(bad):
    msg = refused(pod(env=[{"name": "OK", "value": "1"}, {"name": bad, "value": "x"}]))
    assert "spec.containers[0].env[1].name: Invalid value:" in msg and ENV_RULE in msg


@pytest.mark.parametrize("good", ["A", "_x", "1STARTS_WITH_DIGIT", "my.var-name", "with space", "a:b/c~"])
def test_env_var_names_kubernetes_accepts_still_load(good):
    validate_objects([pod(env=[{"name": good, "value": "x"}])], None, None, "f.yaml")


@pytest.mark.parametrize("field,container", [
    ("env[0].value", {"env": [{"name": "A", "value": "x\0y"}]}),
    ("command[1]", {"command": ["sh", "-c\0"]}),
    ("args[0]", {"args": ["\0"]}),
    ("workingDir", {"workingDir": "/tmp\0/x"}),
])
def test_nul_is_refused_wherever_it_would_reach_argv_or_environment(field, container):
    msg = refused(pod(**container))
    assert f"spec.containers[0].{field}: Invalid value:" in msg and "must not contain a NUL character" in msg


def test_every_writer_refuses_a_bad_env_name(tmp_path):
    # The topology's workloads (netemu up) ...
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY + textwrap.dedent("""\
        workloads:
          - apiVersion: v1
            kind: Pod
            metadata: {name: p}
            spec: {containers: [{name: c, image: busybox, env: [{name: "A=B", value: x}]}]}
        """))
    msg = one_line_error(load_topology, topo, host_networks=[])
    assert str(topo) in msg and "workloads[0]" in msg and "env[0].name" in msg
    # ... a manifest file (apply / create) ...
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(pod(env=[{"name": "A=B", "value": "x"}])))
    assert ENV_RULE in one_line_error(load_manifests, manifest)
    # ... and the API layer itself, for an object that never went through a file.
    store = open_store(tmp_path)
    with pytest.raises(api.ApiError) as info:
        api.create_or_update(store, pod(env=[{"name": "A=B", "value": "x"}]), settings())
    assert str(info.value) == f'Pod "p" is invalid: spec.containers[0].env[0].name: Invalid value: "A=B": {ENV_RULE}'
    assert registry.list_(store, "Pod") == []
    rc = controller("ReplicationController", replicas=1)
    rc["spec"]["template"]["spec"]["containers"][0]["args"] = ["a\0b"]
    with pytest.raises(api.ApiError, match="spec.template.spec.containers.0..args.0.: Invalid value: "
                                           r'"a\\x00b": must not contain a NUL character'):
        api.create_or_update(store, rc, settings())
    assert registry.list_(store, "ReplicationController") == []


# --- item 5: numbers are range-checked as Kubernetes does --------------------------

@pytest.mark.parametrize("kind,field,struct", [
    ("ReplicationController", "replicas", "ReplicationControllerSpec"),
    ("ReplicaSet", "replicas", "ReplicaSetSpec"),
    ("Deployment", "replicas", "DeploymentSpec"),
    ("Job", "parallelism", "JobSpec"),
    ("Job", "completions", "JobSpec"),
    ("Job", "backoffLimit", "JobSpec"),
    ("Deployment", "minReadySeconds", "DeploymentSpec"),
])
def test_int32_fields_beyond_int32_are_refused_with_the_api_servers_words(kind, field, struct):
    msg = refused(controller(kind, **{field: 2147483648}))
    assert (f"spec.{field}: cannot unmarshal number 2147483648 into Go struct field "
            f"{struct}.spec.{field} of type int32") in msg
    validate_objects([controller(kind, **{field: 2147483647})], None, None, "f.yaml")
    assert "must be greater than or equal to 0" in refused(controller(kind, **{field: -1}))


def test_ports_and_other_numbers_are_bounded():
    assert "of type int32" in refused(pod(ports=[{"containerPort": 2 ** 40}]))
    assert "must be between 1 and 65535, got 65536" in refused(pod(ports=[{"containerPort": 65536}]))
    assert "must be between 0 and 65535" in refused(pod(ports=[{"containerPort": 80, "hostPort": 70000}]))
    assert "of type int32" in refused(service(ports=[{"port": 80, "targetPort": 2 ** 31}]))
    assert "of type int64" in refused(controller("Job", activeDeadlineSeconds=2 ** 63))
    assert "must be greater than or equal to 0" in refused(controller("Job", activeDeadlineSeconds=-5))
    bad_grace = pod()
    bad_grace["spec"]["terminationGracePeriodSeconds"] = -1
    assert "spec.terminationGracePeriodSeconds" in refused(bad_grace)


def test_scale_refuses_more_than_int32(tmp_path):
    store = open_store(tmp_path)
    api.create_or_update(store, controller("ReplicationController", replicas=1), settings())
    with pytest.raises(api.ApiError, match="cannot unmarshal number 2147483648 into Go struct field "
                                           r"ScaleSpec.spec.replicas of type int32"):
        kubectl_verbs.scale(store, "rc", "w", 2147483648)
    assert registry.get(store, "ReplicationController", "default", "w")["spec"]["replicas"] == 1


# --- item 6: bounded input ---------------------------------------------------------

def test_devices_fifos_and_directories_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    for path, what in (("/dev/zero", "is a character device, not a regular file"),
                       (str(fifo), "is a FIFO, not a regular file")):
        # As a workload of a topology: the topology's field is named.
        topo = tmp_path / "t.yaml"
        topo.write_text(TOPOLOGY + f"workloads: [{path}]\n")
        msg = one_line_error(load_topology, topo, host_networks=[])
        assert msg == f"{topo}: workloads[0]: {path}: {what}"
        # As a file given to apply, or as the topology itself.
        assert one_line_error(load_manifests, path) == f"{path}: {what}"
        assert one_line_error(load_topology, path, host_networks=[]) == f"{path}: {what}"
    assert one_line_error(load_topology, tmp_path, host_networks=[]) == f"{tmp_path}: is a directory, not a file"


def test_a_fifo_swapped_in_after_the_check_does_not_block(tmp_path, monkeypatch):
    # The read opens without blocking and checks what it opened: a FIFO with no
    # writer would block a plain open() for ever (the test's timeout says so).
    import netemu.topology.yamlsource as ys
    fifo = tmp_path / "late.yaml"
    os.mkfifo(fifo)
    monkeypatch.setattr(ys, "file_problem", lambda path: None)   # the stat() saw a regular file
    assert "is a FIFO, not a regular file" in one_line_error(ys.read_text, fifo, str(fifo))


def test_files_over_the_size_limit_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)       # sparse: costs no disk
    msg = one_line_error(load_manifests, big)
    assert f"{big}: is {MAX_FILE_BYTES + 1} bytes, larger than the limit of {MAX_FILE_BYTES} bytes" == msg


def test_alias_expansion_is_bounded(tmp_path):
    # One 1 MB string referenced 1,000 times: 1 GB once expanded.
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &x " + "y" * 1_000_000 + "\nb: [" + ", ".join(["*x"] * 1000) + "]\n")
    msg = one_line_error(load_manifests, bomb)
    assert f"{bomb}: line 2 column 4: invalid YAML: document contains excessive aliasing" in msg
    # The classic billion laughs: nine levels of ten aliases each.
    laughs = ["a0: &a0 [lol]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    assert "excessive aliasing" in one_line_error(load_manifests, tmp_path / "laughs.yaml")
    # Aliases used sensibly still load.
    assert load_documents("a: &x {k: v}\nb: *x\n", "f")[0].data == {"a": {"k": "v"}, "b": {"k": "v"}}


def test_recursive_aliases_and_deep_nesting_are_refused():
    assert "recursive structure" in one_line_error(load_documents, "&a [*a]\n", "f.yaml")
    assert "nesting deeper than 100 levels" in one_line_error(load_documents, "[" * 500 + "]" * 500, "f.yaml")
    chain = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 300))
    assert "nesting deeper than 100 levels once aliases are expanded" in one_line_error(load_documents, chain, "f")


@pytest.mark.parametrize("cluster,expected", [
    ("{underlay: 128.0.0.0/1}", "cluster.underlay: 128.0.0.0/1 is too large: use a /16 or smaller"),
    ("{underlay: 10.0.0.0/15}", "cluster.underlay: 10.0.0.0/15 is too large"),
    ("{clusterNetwork: 10.0.0.0/9, subnetLen: 30}",
     "cluster.subnetLen: /30 cuts clusterNetwork 10.0.0.0/9 into 2097152 node subnets, more than 65536"),
    ("{clusterNetwork: 10.0.0.0/8, subnetLen: 12}", "cluster.subnetLen: must be between 16 and 30, got 12"),
    ("{timeScale: .inf}", "cluster.timeScale: must be a finite number greater than 0, got number inf"),
])
def test_address_spaces_are_bounded(tmp_path, cluster, expected):
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY + f"cluster: {cluster}\n")
    assert expected in one_line_error(load_topology, topo, host_networks=[])


def test_lease_choice_does_not_list_every_subnet():
    import ipaddress
    from netemu.overlay import leases
    config = leases.network_config(ipaddress.IPv4Network("10.0.0.0/8"), 30, {})     # 4 million subnets
    tracemalloc.start()
    try:
        choices = leases.preferred_subnets(config, ipaddress.IPv4Address("172.30.0.1"), [], None, None,
                                           random.Random(7))
        first = next(iter(choices))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first.prefixlen == 30 and first.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))
    assert peak < 2 ** 20
    # A small network is still searched to its end: every free subnet, once.
    small = leases.network_config(ipaddress.IPv4Network("10.244.0.0/16"), 24, {})
    held = {s: None for s in leases.candidate_subnets(small)[:200]}
    free = list(leases.free_subnets(small, held, random.Random(1)))
    assert sorted(free) == leases.candidate_subnets(small)[200:]


def test_error_lines_are_cut_to_a_sane_length(tmp_path):
    msg = refused(pod(env=[{"name": "A=" + "x" * 100_000, "value": "v"}]))
    assert "more characters)" in msg
    huge_key = tmp_path / "k.yaml"
    huge_key.write_text(yaml.safe_dump({"name": "t", "nodes": [{"name": "a"}], "k" * 100_000: 1}))
    assert len(one_line_error(load_topology, huge_key, host_networks=[])) < 1500


# --- item 11: one-line errors, never a traceback ------------------------------------

def test_nul_bytes_in_a_file_are_a_yaml_error_at_their_line(tmp_path):
    f = tmp_path / "nul.yaml"
    f.write_bytes(b"apiVersion: v1\nkind: Pod\x00\n")
    assert one_line_error(load_manifests, f) == (
        f"{f}: line 2 column 10: invalid YAML: unacceptable character #x0000: special characters are not allowed")


def test_a_huge_integer_names_its_line(tmp_path):
    f = tmp_path / "int.yaml"
    f.write_text("apiVersion: v1\nkind: ReplicationController\nspec:\n  replicas: " + "9" * 5000 + "\n")
    assert f"{f}: line 4 column 13: invalid YAML: integer with 5000 characters is too large" == \
        one_line_error(load_manifests, f)
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY + "cluster: {nodePortRange: '" + "1" * 5000 + "-2'}\n")
    assert "cluster.nodePortRange: must be" in one_line_error(load_topology, topo, host_networks=[])


def test_non_strings_where_strings_are_expected():
    assert "apiVersion: must be a string, got a list" in refused(
        {"apiVersion": ["v1"], "kind": "Pod", "metadata": {"name": "p"}, "spec": {}})
    assert "kind: must be a string" in refused({"apiVersion": "v1", "kind": {"a": 1}})
    strategy = controller("Deployment", strategy={"rollingUpdate": ["x"]})
    assert "spec.strategy.rollingUpdate: must be a mapping" in refused(strategy)
    assert "spec.suspend: must be a boolean" in refused(controller("Job", suspend="yes"))
    bad_affinity = pod()
    bad_affinity["spec"]["affinity"] = "node-a"
    assert "spec.affinity: must be a mapping" in refused(bad_affinity)


@pytest.mark.parametrize("network", ["224.0.0.0/24", "240.0.0.0/24", "127.0.0.0/24", "169.254.0.0/24",
                                     "0.0.0.0/24"])
def test_special_ranges_fail_validation_not_netlink(tmp_path, network):
    for field in ("underlay", "clusterNetwork", "serviceRange"):
        topo = tmp_path / "t.yaml"
        topo.write_text(TOPOLOGY + f"cluster: {{{field}: {network}}}\n")
        msg = one_line_error(load_topology, topo, host_networks=[])
        assert f"cluster.{field}: {network} overlaps the" in msg and "use a private range" in msg


@pytest.mark.parametrize("value,expected", [
    ("abc%", "a valid percent string must be a numeric string followed by an ending '%'"),
    ("25", "a valid percent string"),
    ("150%", None),
])
def test_max_surge_and_max_unavailable_are_checked(value, expected):
    surge = controller("Deployment", strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": value}})
    if expected:
        assert f'spec.strategy.rollingUpdate.maxSurge: Invalid value: "{value}": {expected}' in refused(surge)
    else:
        validate_objects([surge], None, None, "f.yaml")      # maxSurge may exceed 100%
    unavailable = controller("Deployment", strategy={"rollingUpdate": {"maxUnavailable": "150%"}})
    assert "must not be greater than 100%" in refused(unavailable)
    both_zero = controller("Deployment", strategy={"rollingUpdate": {"maxUnavailable": 0, "maxSurge": "0%"}})
    assert "may not be 0 when `maxSurge` is 0" in refused(both_zero)
    recreate = controller("Deployment", strategy={"type": "Recreate", "rollingUpdate": {"maxSurge": 1}})
    assert "Forbidden: may not be specified when strategy `type` is 'Recreate'" in refused(recreate)
    ds = controller("DaemonSet", updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "x"}})
    assert "spec.updateStrategy.rollingUpdate.maxUnavailable: Invalid value" in refused(ds)


@pytest.mark.parametrize("ip,expected", [
    ("not-an-ip", "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"),
    ("127.0.0.1", "may not be in the loopback range"),
    ("0.0.0.0", "may not be unspecified"),
    ("169.254.1.1", "may not be in the link-local range"),
    ("224.0.0.5", "may not be in the link-local multicast range"),
    ("2001:db8::1", "must be an IPv4 address"),
])
def test_external_ips_are_checked(ip, expected):
    msg = refused(service(externalIPs=["10.1.2.3", ip]))
    assert f'spec.externalIPs[1]: Invalid value: "{ip}": {expected}' in msg


def test_long_pod_names_get_kubernetes_hostname():
    # A 253-character subdomain is a valid pod name; the hostname is its first
    # 63 characters without a trailing '-' or '.', as the kubelet makes it.
    name = "a" * 62 + "-" + "b" * 190
    validate_objects([pod() | {"metadata": {"name": name}}], None, None, "f.yaml")
    assert names.pod_hostname(name) == "a" * 62
    assert names.pod_hostname("a" * 61 + ".-x") == "a" * 61
    assert names.pod_hostname("short") == "short"
    from netemu.node.sandbox import Sandbox, pause_argv
    sandbox = Sandbox(namespace="hc-pod-x", veth="veth0", ip="10.244.1.2", gateway="10.244.1.1",
                      prefixlen=24, mtu=1450)
    assert pause_argv(sandbox, name)[-1] == "a" * 62


def _random_yaml(rng: random.Random, depth: int = 0):
    """A random YAML-able structure: mappings of Kubernetes-ish keys, lists and
    scalars of every type PyYAML produces."""
    keys = ["apiVersion", "kind", "metadata", "spec", "name", "labels", "containers", "env", "ports",
            "replicas", "template", "selector", "image", "value", "strategy", "items", "cluster",
            "nodes", "workloads", "underlay", "backend", "x"]
    scalars = [None, True, 0, -1, 2 ** 31, 2 ** 70, 1.5, float("inf"), "", "v1", "Pod", "List",
               "ReplicationController", "Deployment", "Job", "Service", "batch/v1", "apps/v1", "a=b",
               "x" * 300, "10.0.0.0/8", "abc%", "\u00e9"]
    roll = rng.random()
    if depth > 5 or roll < 0.35:
        return rng.choice(scalars)
    if roll < 0.55:
        return [_random_yaml(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(keys): _random_yaml(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_random_structures_give_one_line_errors_never_a_traceback(tmp_path):
    rng = random.Random(12)
    kinds = ["Pod", "ReplicationController", "ReplicaSet", "Deployment", "DaemonSet", "Job", "Service",
             "List", "Namespace"]
    for i in range(1500):
        doc = _random_yaml(rng)
        if isinstance(doc, dict) and rng.random() < 0.7:
            # Mostly objects of a real kind, so the checks past the first are reached.
            kind = rng.choice(kinds)
            doc.update(apiVersion={"Job": "batch/v1", "ReplicationController": "v1", "Pod": "v1",
                                   "Service": "v1", "Namespace": "v1", "List": "v1"}.get(kind, "apps/v1"),
                       kind=kind)
            if rng.random() < 0.7:
                doc["metadata"] = {"name": "n"}
            if rng.random() < 0.1:
                doc[rng.choice(["apiVersion", "kind"])] = _random_yaml(rng, 4)
        manifest = tmp_path / "m.yaml"
        manifest.write_text(yaml.safe_dump(doc))
        try:
            load_manifests(manifest)
        except TopologyError as err:
            assert "\n" not in str(err) and len(str(err)) < 1500
        topo = tmp_path / "t.yaml"
        topo.write_text(yaml.safe_dump(doc if not isinstance(doc, dict) else {"nodes": [{"name": "a"}], **doc}))
        try:
            load_topology(topo, host_networks=[])
        except TopologyError as err:
            assert "\n" not in str(err) and len(str(err)) < 1500


# --- item 17: a Job's labels default from its template --------------------------------

def test_job_labels_default_from_the_template(tmp_path):
    job_file = Path(__file__).parent / "data" / "job-dpkg.yaml"
    [job], _ = load_manifests(job_file)
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert template_labels and job["metadata"]["labels"] == template_labels
    # Labels the Job has are kept; the RC behaves the same, as before.
    own = controller("Job")
    own["metadata"]["labels"] = {"mine": "yes"}
    store = open_store(tmp_path)
    stored, _ = api.create_or_update(store, own, settings())
    assert stored["metadata"]["labels"] == {"mine": "yes"}
    stored, _ = api.create_or_update(store, controller("Job") | {"metadata": {"name": "j2"}}, settings())
    assert stored["metadata"]["labels"] == {"app": "x"}


def test_a_nul_in_a_workload_path_is_an_error_not_a_traceback(tmp_path):
    topo = tmp_path / "t.yaml"
    topo.write_text(TOPOLOGY + 'workloads: ["a\\0b.yaml"]\n')
    assert one_line_error(load_topology, topo, host_networks=[]) == (
        f'{topo}: workloads[0]: Invalid value: "a\\x00b.yaml": a path must not contain a NUL character')
    assert one_line_error(load_manifests, "a\0b.yaml") == "a\0b.yaml: invalid path: it contains a NUL character"


def test_random_cluster_settings_and_nodes_give_one_line_errors(tmp_path):
    from netemu.topology.loader import CLUSTER_KEYS, NODE_KEYS
    rng = random.Random(11)
    values = [None, True, -1, 0, 1, 24, 30, 65536, 2 ** 70, 0.5, float("nan"), float("inf"), "", "udp",
              "vxlan", "host-gw", "nftables", "10.0.0.0/8", "10.1.0.0/16", "10.1.0.0/33", "224.0.0.0/24",
              "10.1.0.5", "10.1.0.1-10.1.0.9", "10.1.0.9-10.1.0.1", "1-2", "30000-32767", "a" * 300,
              [], [1, 2], ["10.1.0.1"], {"type": "vxlan", "vni": 2 ** 30}, {"type": "udp", "port": 0}, {}]
    for _ in range(600):
        cluster = {k: rng.choice(values) for k in rng.sample(CLUSTER_KEYS, rng.randrange(4))}
        nodes = [{k: rng.choice(values + ["n1", "n2"]) for k in rng.sample(NODE_KEYS, rng.randrange(4))}
                 for _ in range(rng.randrange(3))]
        topo = tmp_path / "t.yaml"
        topo.write_text(yaml.safe_dump({"name": rng.choice(["t", 7, "T!", None]), "cluster": cluster,
                                        "nodes": nodes}))
        try:
            load_topology(topo, host_networks=[])
        except TopologyError as err:
            assert "\n" not in str(err) and len(str(err)) < 1500
