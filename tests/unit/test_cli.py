import pytest

from netemu import cli


def test_not_root_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(cli.clusters.os, "geteuid", lambda: 1000)
    assert cli.main(["get", "pods"]) == 1
    err = capsys.readouterr().err
    assert "must run as root" in err and len(err.strip().splitlines()) == 1


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["get"])
    assert e.value.code == 2


def test_unknown_verb_exits_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate"])
    assert e.value.code == 2



def test_help_of_netemu_and_of_every_verb(capsys):
    """`netemu --help` and `netemu VERB --help` print and exit 0 (a stray % in
    a help text once made the first raise)."""
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for argv in [["--help"]] + [[verb, "--help"] for verb in verbs]:
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0, argv
        assert "usage: netemu" in capsys.readouterr().out, argv

# -- kubectl's everyday forms, against a real store in a state folder of our own --------
#
# The commands run as their own process (the real argument parsing, stdout and
# signals) on a store under a private NETEMU_STATE_ROOT; only the root check is
# lifted, so these run without root and without a cluster.

import os
import signal
import subprocess
import sys
import time

from netemu.k8s import selectors
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

CLUSTER = "hecli"
# The verbs against a store alone: no root, and no control plane (its checks are
# tested in tests/integration/test_lifecycle.py).
RUN = ("import sys; from netemu import cli; cli.clusters.require_root = lambda: None; "
       "cli.clusters.check_control_plane = lambda *args: None; "
       "sys.exit(cli.main(sys.argv[1:]))")


@pytest.fixture
def state(tmp_path):
    os.makedirs(tmp_path / CLUSTER)
    store = SqliteStore(str(tmp_path / CLUSTER / "state.db"), create=True)
    yield tmp_path, store
    store.close()


def run(state_root, *args, stdin=None, timeout=20):
    env = dict(os.environ, NETEMU_STATE_ROOT=str(state_root), NETEMU_CLUSTER=CLUSTER)
    return subprocess.run([sys.executable, "-c", RUN, *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def add_pod(store, name, labels=None, **status):
    return registry.create(store, {"apiVersion": "v1", "kind": "Pod",
                                   "metadata": {"name": name, "namespace": "default", "labels": labels or {}},
                                   "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                                   "status": status})


def names_in(table: str) -> list[str]:
    return [line.split()[0] for line in table.splitlines()[1:]]


def test_get_output_name_is_kubectls(state):
    # kubectl get -o name: the kind with its group (pod/a, job.batch/j), as
    # `kubectl delete $(kubectl get ... -o name)` takes it back.
    root, store = state
    add_pod(store, "a")
    registry.create(store, {"kind": "Job", "metadata": {"name": "j", "namespace": "default"},
                            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    assert run(root, "get", "pods", "-o", "name").stdout == "pod/a\n"
    assert run(root, "get", "jobs", "-o", "name").stdout == "job.batch/j\n"


def test_get_takes_names_after_flags_and_refuses_unknown_flags(state):
    root, store = state
    for n in ("a", "b", "c"):
        add_pod(store, n)
    r = run(root, "get", "pods", "-o", "wide", "a", "c")
    assert r.returncode == 0, r.stderr
    assert names_in(r.stdout) == ["a", "c"] and "NODE" in r.stdout.splitlines()[0]
    r = run(root, "get", "pods", "a", "--bogus")
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = run(root, "describe", "pod", "-n", "default", "b")
    assert r.returncode == 0 and r.stdout.startswith("Name:             b\n")


def test_get_selector_equality_set_based_and_show_labels(state):
    root, store = state
    add_pod(store, "web-1", {"app": "web", "tier": "front"})
    add_pod(store, "web-2", {"app": "web", "tier": "back"})
    add_pod(store, "db", {"app": "db"})
    add_pod(store, "bare")
    cases = {"app=web": ["web-1", "web-2"], "app==web,tier=back": ["web-2"],
             "app!=web": ["bare", "db"],                 # != also selects objects without the key
             "tier in (front, back)": ["web-1", "web-2"], "app notin (web)": ["bare", "db"],
             "tier": ["web-1", "web-2"], "!tier": ["bare", "db"], "": ["bare", "db", "web-1", "web-2"]}
    pods = registry.list_(store, "Pod")
    for selector, expected in cases.items():
        requirements = selectors.parse_label_selector(selector)
        assert sorted(p["metadata"]["name"] for p in pods
                      if selectors.labels_match(requirements, p["metadata"]["labels"])) == expected, selector
    for flag, selector in (("-l", "app!=web"), ("--selector", "tier in (front, back)")):
        r = run(root, "get", "pods", flag, selector)
        assert r.returncode == 0, (selector, r.stderr)
        assert sorted(names_in(r.stdout)) == cases[selector], selector
    for bad in ("a b", "a in ()", "-a=b", "a=b c", "a>x", ",a"):
        with pytest.raises(selectors.SelectorError):
            selectors.parse_label_selector(bad)
    r = run(root, "get", "pods", "-l", "app=nothing")
    assert r.returncode == 0 and r.stdout == "" and "No resources found in default namespace." in r.stderr
    r = run(root, "get", "pods", "-l", "tier in (front", "--show-labels")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unable to parse requirement" in r.stderr
    r = run(root, "get", "pods", "db", "-l", "app=db")
    assert r.returncode == 1 and "name cannot be provided when a selector is specified" in r.stderr
    r = run(root, "get", "pods", "--show-labels", "-l", "app=web")
    lines = r.stdout.splitlines()
    assert lines[0].split()[-1] == "LABELS"
    assert lines[1].split()[0] == "web-1" and lines[1].endswith(" app=web,tier=front")
    r = run(root, "get", "pods", "bare", "--show-labels")
    assert r.stdout.splitlines()[1].endswith(" <none>")


def test_describe_with_no_name_describes_all_and_a_name_is_a_prefix(state):
    root, store = state
    add_pod(store, "web-1", {"app": "web"})
    add_pod(store, "web-2", {"app": "web"})
    add_pod(store, "db", {"app": "db"})
    r = run(root, "describe", "pods")
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("Name:")] == ["db", "web-1", "web-2"]
    assert "\n\n\nName:             web-1\n" in r.stdout      # kubectl's two blank lines between objects
    r = run(root, "describe", "pods", "web")
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("Name:")] == ["web-1", "web-2"]
    r = run(root, "describe", "pods", "-l", "app=db")
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("Name:")] == ["db"]
    r = run(root, "describe", "pods", "nothing")
    assert r.returncode == 1 and 'pods "nothing" not found' in r.stderr


def test_get_watch_prints_each_change_until_interrupted(state):
    root, store = state
    add_pod(store, "web-1", {"app": "web"})
    env = dict(os.environ, NETEMU_STATE_ROOT=str(root), NETEMU_CLUSTER=CLUSTER, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", RUN, "get", "pods", "-w", "-l", "app=web"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        header = proc.stdout.readline()
        assert header.split()[:3] == ["NAME", "READY", "STATUS"]
        assert proc.stdout.readline().split()[0] == "web-1"
        add_pod(store, "other", {"app": "x"})                  # not selected: no row
        add_pod(store, "web-2", {"app": "web"})
        registry.mutate(store, "Pod", "default", "web-1",
                        lambda p: p.setdefault("status", {}).update(phase="Running"))
        registry.delete(store, "Pod", "default", "web-2")
        lines = [proc.stdout.readline() for _ in range(3)]
        rows = [line.split() for line in lines]
        assert [(r[0], r[2]) for r in rows] == [("web-2", "Pending"), ("web-1", "Running"), ("web-2", "Pending")]
        # the rows keep the first table's columns
        assert all(line.index(r[2]) == header.index("STATUS") for line, r in zip(lines, rows))
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert proc.stderr.read() == ""                       # no traceback
    finally:
        proc.kill()
        proc.wait()


def test_output_into_a_closed_pipe_ends_quietly(state):
    root, store = state
    for i in range(300):
        add_pod(store, f"pod-{i:03}")
    env = dict(os.environ, NETEMU_STATE_ROOT=str(root), NETEMU_CLUSTER=CLUSTER)
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$RUN" get pods -o yaml | head -1; '
                       'echo "status ${PIPESTATUS[0]}"'],
                       env=dict(env, RUN=RUN), capture_output=True, text=True, timeout=30)
    assert r.stdout == "apiVersion: v1\nstatus 141\n"
    assert r.stderr == ""


def pod_log_dir(root, pod):
    path = root / CLUSTER / "pods" / f"default_{pod}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_logs_takes_kind_slash_name_previous_and_follow(state):
    root, store = state
    running = {"phase": "Running", "containerStatuses": [{"name": "c", "state": {"running": {}}}]}
    add_pod(store, "web", **running)
    (pod_log_dir(root, "web") / "c.log").write_text("now 1\nnow 2\n")
    for ref in ("web", "pod/web", "pods/web", "po/web"):
        r = run(root, "logs", ref)
        assert (r.returncode, r.stdout) == (0, "now 1\nnow 2\n"), (ref, r.stderr)
    r = run(root, "logs", "web", "-p")
    assert r.returncode == 1
    assert r.stderr == 'Error from server (BadRequest): previous terminated container "c" in pod "web" not found\n'
    (pod_log_dir(root, "web") / "c.previous.log").write_text("before the restart\n")
    r = run(root, "logs", "--previous", "pod/web", "--tail", "1")
    assert (r.returncode, r.stdout) == (0, "before the restart\n")

    # A job's logs are its pod's (kubectl picks one and says so when there are several).
    registry.create(store, {"apiVersion": "batch/v1", "kind": "Job",
                            "metadata": {"name": "check", "namespace": "default"},
                            "spec": {"selector": {"matchLabels": {"job-name": "check"}},
                                     "template": {"metadata": {"labels": {"job-name": "check"}},
                                                  "spec": {"containers": [{"name": "c", "image": "x"}]}}}})
    add_pod(store, "check-aaaaa", {"job-name": "check"}, phase="Failed")
    add_pod(store, "check-bbbbb", {"job-name": "check"}, phase="Succeeded")
    (pod_log_dir(root, "check-aaaaa") / "c.log").write_text("failed run\n")
    (pod_log_dir(root, "check-bbbbb") / "c.log").write_text("good run\n")
    r = run(root, "logs", "job/check")
    assert r.returncode == 0 and r.stdout in ("failed run\n", "good run\n")
    assert r.stderr.startswith("Found 2 pods, using pod/check-")
    r = run(root, "logs", "job/nothing")
    assert r.stderr == 'Error from server (NotFound): jobs.batch "nothing" not found\n'

    # -f prints what the container writes until it ends.
    env = dict(os.environ, NETEMU_STATE_ROOT=str(root), NETEMU_CLUSTER=CLUSTER)
    proc = subprocess.Popen([sys.executable, "-c", RUN, "logs", "-f", "web"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "now 1\n"
        assert proc.stdout.readline() == "now 2\n"
        with open(pod_log_dir(root, "web") / "c.log", "a") as f:
            f.write("later\n")
        assert proc.stdout.readline() == "later\n"
        assert proc.poll() is None                      # still running: so is the container
        with open(pod_log_dir(root, "web") / "c.log", "a") as f:
            f.write("last words\n")
        registry.mutate(store, "Pod", "default", "web", lambda p: p["status"].update(
            containerStatuses=[{"name": "c", "state": {"terminated": {"exitCode": 0}}}]))
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == "last words\n"
    finally:
        proc.kill()
        proc.wait()


def test_apply_reads_manifests_from_stdin(state, monkeypatch):
    from netemu import clusterconfig
    from netemu.topology.loader import load_topology

    root, store = state
    topology = load_topology(os.path.join(os.path.dirname(__file__), "..", "..", "topologies", "two-node.yaml"),
                             name=CLUSTER, host_networks=[])
    clusterconfig.create(store, topology)
    manifest = ("apiVersion: v1\nkind: Pod\nmetadata: {name: from-stdin}\n"
                "spec: {containers: [{name: c, image: nginx}]}\n")
    r = run(root, "apply", "-f", "-", stdin=manifest)
    assert (r.returncode, r.stdout) == (0, "pod/from-stdin created\n"), r.stderr
    assert registry.get(store, "Pod", "default", "from-stdin") is not None
    r = run(root, "create", "-f", "-", stdin=manifest)
    assert r.returncode == 1
    assert r.stderr.endswith('Error from server (AlreadyExists): error when creating "STDIN": '
                             'pods "from-stdin" already exists\n')
    r = run(root, "apply", "-f", "-", stdin="apiVersion: v1\nkind: Pod\nmetadata: {name: bad}\nspec: {}\n")
    assert r.returncode == 1 and r.stderr.startswith("error: STDIN") and r.stderr.count("\n") == 1


def test_exec_gives_the_command_the_default_sigpipe():
    """`netemu exec POD -- yes | head -1`: the command ends by SIGPIPE as in a
    container (Python's ignored SIGPIPE would survive the exec: `yes` would
    complain about a broken pipe)."""
    code = "import os; from netemu import cli; cli.exec_command(['yes'], dict(os.environ))"
    r = subprocess.run(["bash", "-c", f'"{sys.executable}" -c "$CODE" | head -1; echo "status ${{PIPESTATUS[0]}}"'],
                       env=dict(os.environ, CODE=code), capture_output=True, text=True, timeout=30)
    assert (r.stdout, r.stderr) == ("y\nstatus 141\n", "")


@pytest.mark.parametrize("word,message", [
    ("ep", 'Error from server (NotFound): endpoints "nosuch" not found'),        # was: endpointss
    ("jobs", 'Error from server (NotFound): jobs.batch "nosuch" not found'),
    ("po", 'Error from server (NotFound): pods "nosuch" not found'),
])
def test_get_missing_object_words_it_as_kubectl(tmp_path, monkeypatch, capsys, word, message):
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    monkeypatch.setattr(cli.clusters, "require_root", lambda: None)
    monkeypatch.setattr(cli, "_store", lambda args: ("c", store))
    assert cli.main(["get", word, "nosuch"]) == 1
    assert capsys.readouterr().err.strip() == message
    assert cli.main(["describe", word, "nosuch"]) == 1
    assert capsys.readouterr().err.strip() == message


def test_stats_shows_malformed_reasons_only_wide(state):
    from netemu.overlay import stats

    root, store = state
    registry.create(store, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    # What n1's overlay daemon last published; no daemon answers the CLI's
    # request for a fresh one (stats.COLLECT_TIMEOUT), so this is shown.
    store.put(stats.stats_key("n1"), {"backend": "udp", "subnet": "10.244.1.0/24", "counters": {
        "tx_packets": 5, "drop_malformed": 3, "malformed_truncated": 2, "malformed_checksum": 1}})
    r = run(root, "stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0].split() == ["NODE", "BACKEND", "SUBNET", "DROP_MALFORMED", "TX_PACKETS"]
    r = run(root, "stats", "-o", "wide")
    assert "MALFORMED_TRUNCATED" in r.stdout.split("\n")[0] and "MALFORMED_CHECKSUM" in r.stdout
