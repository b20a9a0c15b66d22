"""Every command the README shows, run as printed against the tutorial's cluster.

The commands are read from README.md itself, so a line someone adds to one of
its command blocks is run too:

- the set-up block of "## Set-up": the cluster comes from its line
  `tools/install.sh && netemu up topologies/tutorial.yaml` (the part after the
  install script; install.sh and test.sh themselves are not run here: they
  install the machine and run this very suite);
- every indented block of "## Using it", except the block a paragraph starting
  "Benchmarks" introduces: those take minutes and the whole machine, so only
  their flags are checked, against the `--help` of the command shown and, for
  `netemu bench`, against netemu's own argument parser.

Each command runs with `bash -e -o pipefail -c LINE` in the repository's folder,
with this virtual environment's `netemu` first on PATH, and must exit 0 with
no traceback and, where the README says what it shows, that output. A command
whose comment says "until Ctrl-C" gets a SIGINT to its process group after a
few seconds, as a reader's terminal would send, and must then exit 0.
`<CLUSTER-IP>` and `<EXTERNAL-IP>` stand for what an earlier command printed:
the addresses of the service the README last exposed. Before each command the
test waits until the cluster has settled (no pod starting), as a reader does;
commands that go through service rules (curl, trace) are retried for a while,
since the proxies follow the API with a short delay.

The cluster is named `tutorial` (the README's), so the test holds
/tmp/netemu-cluster-tutorial.lock for its whole run and removes the cluster at
the end, whatever happened. The machine is shared: NETEMU_CLUSTER=tutorial
picks it among other clusters, where a reader's machine has only this one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netemu import cluster as clusters, netns

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CLUSTER = "tutorial"
LOCK = "/tmp/netemu-cluster-tutorial.lock"
VENV_BIN = os.path.dirname(sys.executable)
INTERRUPT_AFTER = 4.0          # seconds a Ctrl-C command runs before its SIGINT
RETRY_FOR = 45.0               # seconds a command through service rules is retried
SETTLE_FOR = 120.0


# -- reading the README ------------------------------------------------------------

def code_blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """(section heading, introducing paragraph, lines) of every indented code
    block (four spaces) outside ``` fences; a subsection's blocks go with its
    section."""
    out = []
    heading, paragraph, block = "", [], None
    fenced = False
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("    ") and (block is not None or not paragraph or paragraph[-1] == ""):
            if block is None:
                block = []
            block.append(line[4:])
            continue
        if block is not None and line.strip() == "":
            block.append("")        # a blank line inside a block, or its end
            continue
        if block is not None:
            intro = " ".join(p for p in paragraph if p).strip()
            out.append((heading, intro, [b for b in block if b.strip()]))
            block, paragraph = None, []
        if line.startswith("#"):
            # A subsection ("### ...") belongs to its section: its blocks run
            # with the section's.
            if not line.startswith("###"):
                heading = line.lstrip("#").strip()
            paragraph = []
        elif line.strip() == "":
            if paragraph and paragraph[-1] != "":
                paragraph.append("")
        else:
            if paragraph and paragraph[-1] == "":
                paragraph = []
            paragraph.append(line.strip())
    if block is not None:
        out.append((heading, " ".join(p for p in paragraph if p).strip(), [b for b in block if b.strip()]))
    return out


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment): a comment starts at a `#` after white space."""
    m = re.search(r"\s#(\s|$)", line)
    if m is None:
        return line.strip(), ""
    return line[:m.start()].strip(), line[m.start():].strip().lstrip("#").strip()


def commands(lines: list[str]) -> list[tuple[str, str]]:
    """(command, comment) per line; a line that is only a comment continues the
    comment of the line before it."""
    out: list[tuple[str, str]] = []
    for line in lines:
        command, comment = split_comment(line)
        if not command:
            if out:
                out[-1] = (out[-1][0], f"{out[-1][1]} {comment}".strip())
            continue
        out.append((command, comment))
    return out


def readme_plan(text: str):
    """(set-up commands, commands to run, benchmark commands)."""
    setup, run, bench = [], [], []
    for heading, intro, lines in code_blocks(text):
        if heading.startswith("Set-up"):
            for command, _ in commands(lines):
                parts = [p.strip() for p in command.split("&&")]
                setup += [p for p in parts if not re.match(r"^(\./)?tools/(install|test)\.sh\b", p)]
        elif heading.startswith("Using it"):
            (bench if intro.startswith("Benchmarks") else run).extend(commands(lines))
        elif heading == "Links":
            run.extend(commands(lines))
    return setup, run, bench


def test_the_readme_has_the_blocks_this_test_runs():
    """The extraction itself (no cluster): the set-up line, the blocks of
    "Using it", the benchmarks set apart, comments and continuations."""
    setup, run, bench = readme_plan(README.read_text())
    assert setup == ["netemu up topologies/tutorial.yaml"]
    texts = [c for c, _ in run]
    for expected in ("netemu get nodes -o wide", "netemu expose rc podtoservcie --port=80",
                     "netemu apply -f topologies/tutorial/job-dpkg.yaml", "netemu graph -o /tmp/cluster.png",
                     "kubectl --context netemu-tutorial get rc podtoservcie",        # a subsection's block
                     "netemu link set srv-k8s-node2 --clear"):                       # the Links section's
        assert expected in texts
    assert not any("sudo" in c for c in texts + [c for c, _ in bench] + setup)
    assert not any(c.startswith(("netemu bench", ".venv/bin/python tools/bench")) for c in texts)
    assert [c.split()[:2] for c, _ in bench] == [["netemu", "bench"], ["netemu", "bench"], ["netemu", "bench"],
                                                 [".venv/bin/python", "tools/bench_proxy.py"],
                                                 [".venv/bin/python", "tools/bench_up.py"],
                                                 [".venv/bin/python", "tools/bench_propagation.py"],
                                                 [".venv/bin/python", "tools/latency_hops.py"],
                                                 [".venv/bin/python", "tools/latency_sched.py"],
                                                 [".venv/bin/python", "tools/bench_api.py"],
                                                 [".venv/bin/python", "tools/bench_machines.py"]]
    assert "64-byte UDP rate" in bench[0][1]                   # a comment continued on the next line
    assert sum("until Ctrl-C" in comment for _, comment in run) >= 3


# -- the benchmarks: flags only ------------------------------------------------------

def test_the_benchmark_commands_flags_parse():
    from netemu import cli

    _, _, bench = readme_plan(README.read_text())
    assert bench
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}")
    for command, _ in bench:
        argv = shlex.split(command)
        flags = [a.split("=", 1)[0] for a in argv if a.startswith("-")]
        # `netemu bench --help`, `.venv/bin/python tools/X.py --help`
        help_ = subprocess.run(argv[:2] + ["--help"], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=60)
        assert help_.returncode == 0, (command, help_.stderr)
        for flag in flags:
            assert re.search(rf"(^|[\s,\[]){re.escape(flag)}([\s,=\]]|$)", help_.stdout, re.M), \
                f"{command}: {flag} is not in the --help of {' '.join(argv[:2])}"
        if argv[0] == "netemu":
            args = cli.build_parser().parse_args(argv[1:])       # SystemExit(2) on a bad flag
            assert args.func.__name__ == "cmd_bench" or args.func.__module__.endswith("bench.cli")


# -- running the rest against the tutorial's cluster ------------------------------------

# What the output shows, where the README says it (command pattern -> output pattern).
EXPECTED = [
    (r"^netemu get nodes", r"srv-k8s-node1\s+Ready"),
    (r"^netemu get pods", r"nginxpod\s+2/2\s+Running"),
    (r"^netemu describe pod nginxpod", r"(?m)^Name:\s+nginxpod$"),
    (r"curl -s (?!http://localhost:8080)", r"<p>pod \S+, container \S+, node srv-k8s-\w+</p>"),
    (r"curl -s http://localhost:8080/apis/extensions/v1beta1", r'"name": ?"daemonsets"'),
    (r"kubectl get pods -o wide", r"nginxpod\s+2/2\s+Running"),
    (r"^netemu shell srv-k8s-master1 -- hostname$", r"^srv-k8s-master1$"),
    (r"^netemu shell srv-k8s-node2 -- kubectl get nodes", r"srv-k8s-master1\s+Ready"),
    (r"kubectl .*describe service podtoservcie", r"(?m)^Name:\s+podtoservcie$"),
    (r"kubectl .*scale rc podtoservcie", r"replicationcontroller/podtoservcie scaled"),
    (r"kubectl .*get rc podtoservcie", r"podtoservcie\s+3\s"),
    (r"kubectl .*get svc kubernetes", r"kubernetes\s+ClusterIP\s+10\.254\.0\.1\s+<none>\s+8080/TCP"),
    (r"kubectl .*--chunk-size=2", r"nginxpod\s+2/2\s+Running"),
    (r"kubectl .*--timestamps", r"(?m)^\d{4}-\d\d-\d\dT[\d:.]+Z ii  \S"),       # dpkg -l's last lines, stamped
    (r"^netemu kubeconfig", r"netemu-tutorial"),
    (r"^netemu link show srv-k8s-node2$", r"srv-k8s-node2"),
    (r"^netemu link show -o json", r'"srv-k8s-node1"'),
    (r"^netemu link show pod/nginxpod", r"(?m)^pod/default/nginxpod\s+<none>"),
    (r"ip add \| grep inet", r"inet 10\.1\.96\.233/24"),
    (r"tcpdump -ni docker0", r"listening on docker0"),
    (r"^netemu stats", r"(?m)^NODE\s+BACKEND\s+SUBNET"),
    (r"^netemu logs node/", r"\S"),
    (r"^netemu apply -f", r"(created|configured|unchanged)$"),
    (r"^netemu expose", r"^service/\S+ exposed$"),
    (r"^netemu describe service podtoservcie", r"(?m)^Endpoints:\s+\d+\.\d+\.\d+\.\d+:80"),
    (r"^netemu get svc", r"my-second-service\s+LoadBalancer"),
    (r"nft list ruleset \| grep my-second-service", r"my-second-service"),
    (r"^netemu get jobs", r"package-check\s+Complete\s+1/1"),
    (r"netemu logs job/package-check", r"Desired=Unknown/Install"),       # dpkg-query -l's header
    (r"^netemu label node", r"node/srv-k8s-node1 labeled"),
    (r"^netemu capture nginxpod -w", r"into /tmp/pod\.pcap"),
    (r"^netemu trace", r"(?s)connected.*forward \(\d+/\d+ hops saw the probe\)"),
    (r"^netemu graph -o", r"written to /tmp/cluster\.png"),
]
RETRIED = re.compile(r"\bcurl\b|^netemu trace\b")
MUTATING = re.compile(r"^netemu (apply|create|delete|expose|label|scale|node|link set|up|down|clean)\b")


def _env() -> dict:
    return dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", NETEMU_CLUSTER=CLUSTER)


def _netemu_json(*args: str):
    r = subprocess.run([f"{VENV_BIN}/netemu", *args, "-o", "json"], env=_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _settled() -> bool:
    """No pod is starting or stopping: each is Running with its containers
    ready, or has finished (a Job's)."""
    for pod in _netemu_json("get", "pods", "-A").get("items", []):
        status = pod.get("status") or {}
        if pod["metadata"].get("deletionTimestamp"):
            return False
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        if status.get("phase") != "Running" or not all(c.get("ready") for c in status.get("containerStatuses", [])):
            return False
    return True


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)
    return result


def _exposed_service(command: str) -> str | None:
    """The service an `expose` line makes: --name, else the exposed object's name."""
    argv = shlex.split(command)
    if argv[:2] != ["netemu", "expose"]:
        return None
    for i, a in enumerate(argv):
        if a.startswith("--name="):
            return a.split("=", 1)[1]
        if a == "--name":
            return argv[i + 1]
    positional = [a for a in argv[2:] if not a.startswith("-")]
    return positional[1] if len(positional) > 1 else positional[0].split("/", 1)[-1]


def fill_placeholders(command: str, exposed: list[str]) -> str:
    """<NODE-IP>: the address of nginxpod's node; <CLUSTER-IP>: the ClusterIP of
    the service last exposed; <EXTERNAL-IP>: the external IP of the last exposed
    one that has one (the reader copies them from `get pods -o wide` and `get
    nodes -o wide`, `describe service` and `get svc`)."""
    def value(m):
        word = m.group(1)
        if word == "NODE-IP":
            # The node nginxpod runs on (get pods -o wide), its INTERNAL-IP (get nodes -o wide).
            node = _netemu_json("get", "pod", "nginxpod")["spec"]["nodeName"]
            return next(a["address"] for a in _netemu_json("get", "node", node)["status"]["addresses"]
                        if a["type"] == "InternalIP")
        assert exposed, f"{command}: <{word}> before any service was exposed"
        if word == "CLUSTER-IP":
            return _netemu_json("get", "svc", exposed[-1])["spec"]["clusterIP"]
        if word == "EXTERNAL-IP":
            for name in reversed(exposed):
                if _netemu_json("get", "svc", name)["spec"].get("type") == "LoadBalancer":
                    return _wait(lambda: next((i["ip"] for i in (_netemu_json("get", "svc", name).get("status") or {})
                                               .get("loadBalancer", {}).get("ingress", []) if i.get("ip")), None),
                                 60, f"the external IP of {name}")
            raise AssertionError(f"{command}: <EXTERNAL-IP> but no LoadBalancer service was exposed")
        raise AssertionError(f"{command}: the placeholder <{word}> has no rule in {__file__}")
    return re.sub(r"<([A-Z][A-Z-]*)>", value, command)


def run_line(command: str, interrupt: bool) -> subprocess.CompletedProcess:
    argv = ["bash", "-e", "-o", "pipefail", "-c", command]
    if not interrupt:
        return subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        time.sleep(INTERRUPT_AFTER)
        assert proc.poll() is None, f"{command}: ended by itself (status {proc.returncode}) before Ctrl-C: " \
                                    f"{proc.communicate()}"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def tutorial_lock():
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # another reader of the README: wait for them
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def teardown() -> None:
    # Without NETEMU_CLUSTER in its own environment: a `down` that looks for
    # processes by that variable must not find itself.
    env = {k: v for k, v in _env().items() if k != "NETEMU_CLUSTER"}
    r = subprocess.run([f"{VENV_BIN}/netemu", "down", CLUSTER], env=env, capture_output=True, text=True,
                       timeout=180)
    if r.returncode != 0 and CLUSTER in clusters.running_clusters():
        subprocess.run([f"{VENV_BIN}/netemu", "clean", CLUSTER], env=env, capture_output=True, timeout=180)
    left = [ns for ns in netns.list_all() if ns.startswith(f"{CLUSTER}-")]
    assert CLUSTER not in clusters.running_clusters() and not left, f"left behind: {left}"


def test_every_readme_command_runs_as_printed():
    setup, run, _ = readme_plan(README.read_text())
    assert setup and run
    files = {p for c, _ in run for p in re.findall(r"/tmp/[\w./-]+", c)}
    existed = {p for p in files if os.path.exists(p)}
    failures, exposed = [], []
    with tutorial_lock():
        if CLUSTER in clusters.running_clusters():
            pytest.fail(f'a cluster named "{CLUSTER}" is running and it is not this test\'s: '
                        "the README's cluster needs that name")
        try:
            for command in setup:
                r = run_line(command, False)
                assert r.returncode == 0, f"set-up `{command}` exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
                assert f'cluster "{CLUSTER}" is ready' in r.stdout, r.stdout
            for template, comment in run:
                _wait(_settled, SETTLE_FOR, "the pods to settle")
                command = fill_placeholders(template, exposed)
                interrupt = "until Ctrl-C" in comment
                deadline = time.monotonic() + (RETRY_FOR if RETRIED.search(command) else 0)
                while True:
                    r = run_line(command, interrupt)
                    output = r.stdout + r.stderr
                    problems = []
                    if r.returncode != 0:
                        problems.append(f"exit status {r.returncode}")
                    if "Traceback (most recent call last)" in output:
                        problems.append("a traceback")
                    for pattern, wanted in EXPECTED:
                        if re.search(pattern, command) and not re.search(wanted, output.strip(), re.M):
                            problems.append(f"no /{wanted}/ in its output")
                    if not problems or MUTATING.search(command) or time.monotonic() > deadline:
                        break
                    time.sleep(2)
                if problems:
                    failures.append(f"`{command}`: {', '.join(problems)}\n--- stdout\n{r.stdout[:3000]}\n"
                                    f"--- stderr\n{r.stderr[-3000:]}")
                if (name := _exposed_service(command)) and r.returncode == 0:
                    exposed.append(name)
            if os.path.exists("/tmp/cluster.png"):
                with open("/tmp/cluster.png", "rb") as f:
                    assert f.read(8) == b"\x89PNG\r\n\x1a\n", "graph -o /tmp/cluster.png wrote no PNG"
        finally:
            try:
                teardown()
            finally:
                for path in files - existed:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
    assert not failures, "README commands that failed:\n\n" + "\n\n".join(failures)
