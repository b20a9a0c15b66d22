"""The workload verbs of the netemu command: apply, create, delete, expose, scale, label.

netemu.cli's build_parser calls `register(sub, verb, with_cluster)`. Each verb is
a thin layer over netemu.api (the API server's admission: create_or_update,
delete) and, for kubectl's client-side verbs, netemu.kubectl_verbs (expose,
scale, label: worked out here, written through admission) on a running
cluster's store, printing what kubectl prints:

    netemu apply -f FILE|DIR [-f ...]        pod/nginxpod created | service/x configured | ... unchanged
    netemu create -f FILE|DIR                 Error from server (AlreadyExists): ... if it exists
    netemu delete -f FILE | KIND NAME...      pod "x" deleted  (waits until gone; --wait=false not)
    netemu delete pod X --force --grace-period=0   pod "x" force deleted  (the kubelet cleans up after)
    netemu expose KIND NAME [--port N] ...    service/NAME exposed
    netemu scale KIND NAME --replicas N       replicationcontroller/NAME scaled
    netemu label KIND NAME k=v k2- [--overwrite]   node/n1 labeled | unlabeled | not labeled

Manifests go through the topology loader (decode, convert old apiVersions,
default, validate) against the running cluster's settings and nodes. apply and
create go on past what is bad, as kubectl does: every object that is valid
(alone, and with the valid objects before it) is stored and printed; each file
that cannot be read or parsed and each invalid object is one `error: ` line on
stderr after them, and the exit status is 1. Refusals of the API server are
printed as kubectl prints them (`Error from server (NotFound): pods "x" not
found`) and exit 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from netemu import api, cluster as clusters, kubectl_verbs
from netemu.k8s import kinds
from netemu.store import registry

DELETE_TIMEOUT = 60.0


class WorkloadCliError(ValueError):
    """Bad input to a workload verb (netemu.cli prints ValueErrors as one line)."""


def register(sub, verb, with_cluster) -> None:
    """Add apply, create, delete, expose, scale and label to the netemu command."""
    for name, func, help_ in (
            ("apply", cmd_apply, "create or update objects from manifest files (kubectl apply -f)"),
            ("create", cmd_create, "create objects from manifest files; existing ones are an error")):
        sp = with_cluster(verb(name, func, help_))
        sp.add_argument("-f", "--filename", action="append", required=True, metavar="FILE",
                        help="a manifest file, a directory of them, or - for standard input (repeatable)")
        _namespace(sp)

    sp = with_cluster(verb("delete", cmd_delete, "delete objects: netemu delete KIND NAME... | -f FILE"))
    sp.add_argument("args", nargs="*", metavar="KIND NAME", help="KIND NAME [NAME...] or KIND/NAME...")
    sp.add_argument("-f", "--filename", action="append", default=[], metavar="FILE")
    sp.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                    help="wait until the objects are gone (default: yes, as kubectl)")
    sp.add_argument("--timeout", type=float, default=DELETE_TIMEOUT, metavar="SECONDS")
    sp.add_argument("--grace-period", type=int, default=-1, metavar="SECONDS",
                    help="seconds a pod gets to stop (-1: its own terminationGracePeriodSeconds; "
                         "0 with --force: remove the object at once)")
    sp.add_argument("--force", action="store_true",
                    help="with --grace-period=0: remove pods from the store at once, "
                         "without waiting for their kubelet")
    sp.add_argument("--now", action="store_true", help="same as --grace-period=1")
    _namespace(sp)

    sp = with_cluster(verb("expose", cmd_expose, "make a Service for a pod, rc, rs or deployment"))
    sp.add_argument("kind")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--port", type=int)
    sp.add_argument("--target-port")
    sp.add_argument("--type", default="ClusterIP", choices=["ClusterIP", "NodePort", "LoadBalancer"])
    sp.add_argument("--name", dest="service_name")
    sp.add_argument("--protocol", default="TCP", choices=["TCP", "UDP", "SCTP"])
    _namespace(sp)

    sp = with_cluster(verb("scale", cmd_scale, "set the replicas of an rc, rs or deployment"))
    sp.add_argument("kind")
    sp.add_argument("name", nargs="?")
    sp.add_argument("--replicas", type=int, required=True)
    _namespace(sp)

    sp = with_cluster(verb("label", cmd_label, "add (key=value) or remove (key-) labels of an object"))
    sp.add_argument("kind")
    sp.add_argument("rest", nargs="+", metavar="NAME KEY=VALUE|KEY-")
    sp.add_argument("--overwrite", action="store_true")
    _namespace(sp)


def _namespace(sp) -> None:
    sp.add_argument("-n", "--namespace", default=None)


# -- kinds (their names: netemu.k8s.kinds) -----------------------------------------

def _kind(word: str) -> str:
    try:
        return kinds.resolve(word)
    except KeyError:
        raise WorkloadCliError(f'the server doesn\'t have a resource type "{word}"') from None


def _server_error(e: api.ApiError) -> str:
    """kubectl's line for a refusal: client-side checks say `error:`, the API
    server's `Error from server (Reason):`."""
    if e.reason == "BadRequest":
        return f"error: {e}"
    return f"Error from server ({e.reason}): {e}"


def _kind_name(kind: str, name: str | None, verb: str) -> tuple[str, str]:
    """KIND NAME or KIND/NAME, as kubectl takes both."""
    if "/" in kind and name is None:
        kind, name = kind.split("/", 1)
    if not name:
        raise WorkloadCliError(f"{verb}: expected KIND NAME or KIND/NAME")
    return _kind(kind), name


# -- loading manifests -------------------------------------------------------------

def _cluster_context(cluster: str, store):
    """(settings, nodes) to validate manifests against: the cluster's settings
    from its topology, the nodes as the store has them now (nodes added with
    `netemu node add` included)."""
    from netemu import clusterconfig
    from netemu.topology.model import NodeSpec

    settings = clusterconfig.read(cluster, store).settings
    nodes = [NodeSpec(name=n["metadata"]["name"], labels=dict(n["metadata"].get("labels") or {}),
                      address=None, pod_cidr=None, unschedulable=bool((n.get("spec") or {}).get("unschedulable")))
             for n in registry.list_(store, "Node")]
    return settings, nodes


def _inputs(paths: list[str]) -> list:
    """The manifest files -f names, in order ("-": standard input; a directory:
    its manifests). Refuses what kubectl refuses before reading anything: a
    missing path, a directory without manifests."""
    from netemu.topology import manifests

    files = []
    for given in paths:
        if given == "-":
            files.append(given)
            continue
        path = Path(given)
        if not path.exists():
            raise WorkloadCliError(f'the path "{given}" does not exist')
        found = manifests.manifest_files(path)
        if path.is_dir() and not found:
            raise WorkloadCliError(f'no manifest (.yaml, .yml, .json) in the directory "{given}"')
        files.extend(found)
    return files


def load_files(paths: list[str], settings=None, nodes=None) -> list[dict]:
    """Every object of the files (directories: their manifests), validated alone
    and together before anything is stored. Warnings go to stderr. Raises
    TopologyError."""
    from netemu.topology import manifests

    entries = []
    for file in _inputs(paths):
        entries.extend(_read_stdin() if file == "-" else manifests.read_manifest_file(file))
    if not entries:
        raise WorkloadCliError("no objects passed to apply")
    for warning in manifests.check_batch(entries, settings, nodes):
        print(f"Warning: {warning}", file=sys.stderr)
    return [e.obj for e in entries]


STDIN_LIMIT = 16 << 20


def _read_stdin(errors=None) -> list:
    """`-f -`: the manifests on standard input, named STDIN in errors as kubectl
    names them. They are copied (at most STDIN_LIMIT bytes, so that `< /dev/zero`
    ends) into a temporary regular file and read like any manifest file."""
    import tempfile
    from netemu.topology import manifests

    with tempfile.NamedTemporaryFile(prefix="netemu-stdin-", suffix=".yaml") as tmp:
        size = 0
        while chunk := sys.stdin.buffer.read(1 << 16):
            size += len(chunk)
            if size > STDIN_LIMIT:
                raise WorkloadCliError(f"STDIN: more than {STDIN_LIMIT >> 20} MiB of manifests")
            tmp.write(chunk)
        tmp.flush()
        return manifests.read_manifest_file(Path(tmp.name), display="STDIN", errors=errors)


def load_each(paths: list[str], settings=None, nodes=None, verb: str = "apply") -> tuple[list, list[str]]:
    """kubectl's -f for apply and create (its builder continues on error):
    (entries that passed, one error line per file or object that did not).

    A file that cannot be read or parsed is one error; in a readable file,
    each object is checked alone, then with the accepted objects before it
    (duplicates, clusterIPs, nodePorts, hostPorts), so the first of two
    conflicting objects is kept and the second refused, as the API server
    would. Warnings go to stderr. Raises WorkloadCliError only for what
    kubectl refuses before reading anything: a missing path, an empty
    directory, and no object at all.
    """
    from netemu.topology import manifests
    from netemu.topology.model import TopologyError

    entries, errors = [], []
    for file in _inputs(paths):
        problems: list[TopologyError] = []
        try:
            entries.extend(_read_stdin(errors=problems) if file == "-" else
                           manifests.read_manifest_file(file, errors=problems))
        except TopologyError as e:
            problems.append(e)
        errors.extend(str(e) for e in problems)
    if not entries and not errors:
        raise WorkloadCliError(f"no objects passed to {verb}")
    warnings: list[str] = []
    try:
        # The usual case, all valid together: one pass.
        warnings = manifests.check_batch(entries, settings, nodes)
        accepted = entries
    except TopologyError:
        accepted = []
        for e in entries:
            try:
                more = manifests.check_batch(accepted + [e], settings, nodes)
            except TopologyError as err:
                errors.append(str(err))
                continue
            accepted.append(e)
            for w in more:          # each pass repeats the earlier objects' warnings
                if w not in warnings:
                    warnings.append(w)
    for warning in warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    return accepted, errors


def _in_namespace(objs: list[dict], namespace: str | None) -> list[dict]:
    """-n NS puts objects that name no namespace (the loader defaulted them to
    "default") into NS."""
    if namespace and namespace != "default":
        for obj in objs:
            if getattr(kinds.BY_KIND.get(obj.get("kind")), "namespaced", False) and \
                    obj["metadata"].get("namespace", "default") == "default":
                obj["metadata"]["namespace"] = namespace
    return objs


def _open(args):
    cluster = clusters.resolve(args.cluster)
    # Every verb here changes something: refused when no control plane would act on it.
    clusters.check_control_plane(cluster, True,
                                 lambda line: print(f"netemu: warning: {line}", file=sys.stderr))
    return cluster, clusters.open_store(cluster)


# -- verbs ---------------------------------------------------------------------------

def cmd_apply(args) -> int:
    cluster, store = _open(args)
    try:
        settings, nodes = _cluster_context(cluster, store)
        entries, errors = load_each(args.filename, settings, nodes)
        failed = bool(errors)
        for entry in entries:
            [obj] = _in_namespace([entry.obj], args.namespace)
            try:
                stored, verb = api.create_or_update(store, obj, settings)
            except api.ApiError as e:
                print(_server_error(e), file=sys.stderr)
                failed = True
                continue
            print(f"{kinds.BY_KIND[stored['kind']].ref(stored['metadata']['name'])} {verb}")
        _print_load_errors(errors)
        return 1 if failed else 0
    finally:
        store.close()


def _print_load_errors(errors: list[str]) -> None:
    # kubectl prints what it could not read or validate after what it applied.
    for line in errors:
        print(f"error: {line}", file=sys.stderr)


def cmd_create(args) -> int:
    cluster, store = _open(args)
    try:
        settings, nodes = _cluster_context(cluster, store)
        entries, errors = load_each(args.filename, settings, nodes, verb="create")
        failed = bool(errors)
        for entry in entries:
            [obj] = _in_namespace([entry.obj], args.namespace)
            kind, meta = obj["kind"], obj["metadata"]
            if kind in kinds.BY_KIND and registry.get(store, kind, meta.get("namespace"), meta["name"]):
                print(f'Error from server (AlreadyExists): error when creating "{entry.origin.file}": '
                      f'{kinds.BY_KIND[kind].qualified()} "{meta["name"]}" already exists', file=sys.stderr)
                failed = True
                continue
            try:
                stored, verb = api.create_or_update(store, obj, settings)
            except api.ApiError as e:
                print(_server_error(e), file=sys.stderr)
                failed = True
                continue
            if verb != "created":      # someone created it between our check and our write
                print(f'Error from server (AlreadyExists): {kinds.BY_KIND[kind].qualified()} "{meta["name"]}" '
                      "already exists", file=sys.stderr)
                failed = True
                continue
            print(f"{kinds.BY_KIND[kind].ref(stored['metadata']['name'])} created")
        _print_load_errors(errors)
        return 1 if failed else 0
    finally:
        store.close()


def _delete_targets(args) -> list[tuple[str, str | None, str]]:
    """(kind, namespace, name) for each object the command names."""
    ns = args.namespace or "default"
    targets = []
    if args.filename:
        if args.args:
            raise WorkloadCliError("delete: give either -f FILE or KIND NAME, not both")
        for obj in _in_namespace(load_files(args.filename), args.namespace):
            kind = _kind(obj["kind"])
            targets.append((kind, obj["metadata"].get("namespace") if kinds.BY_KIND[kind].namespaced else None,
                            obj["metadata"]["name"]))
        return targets
    if not args.args:
        raise WorkloadCliError("delete: expected KIND NAME [NAME...], KIND/NAME... or -f FILE")
    if "/" in args.args[0]:
        pairs = []
        for item in args.args:
            if "/" not in item:
                raise WorkloadCliError(f"there is no need to specify a resource type as a separate argument "
                                       f"when passing arguments in resource/name form (e.g. 'netemu delete "
                                       f"pod/NAME' instead of 'netemu delete pod NAME'): {item}")
            pairs.append(tuple(item.split("/", 1)))
    else:
        if len(args.args) < 2:
            raise WorkloadCliError(f'delete: which {args.args[0]}? (netemu delete {args.args[0]} NAME)')
        pairs = [(args.args[0], name) for name in args.args[1:]]
    for word, name in pairs:
        kind = _kind(word)
        targets.append((kind, ns if kinds.BY_KIND[kind].namespaced else None, name))
    return targets


FORCE_WARNING = ("Warning: Immediate deletion does not wait for confirmation that the running "
                 "resource has been terminated. The resource may continue to run on the cluster indefinitely.")


def grace_period_of(args) -> int | None:
    """kubectl's reading of --grace-period, --now and --force: None means each
    pod's own terminationGracePeriodSeconds, 0 a forced, immediate removal."""
    grace = args.grace_period
    if args.now:
        if grace >= 0:
            raise WorkloadCliError("delete: --now and --grace-period cannot be specified together")
        grace = 1
    if grace == 0 and not args.force:
        # kubectl: "to preserve backwards compatibility, but prevent accidental
        # data loss", --grace-period=0 alone means 1.
        grace = 1
    if args.force and grace < 0:
        grace = 0
    return None if grace < 0 else grace


def cmd_delete(args) -> int:
    targets = _delete_targets(args)
    grace = grace_period_of(args)
    if grace == 0:
        print(FORCE_WARNING, file=sys.stderr)
    cluster, store = _open(args)
    try:
        failed = False
        deleted = []
        for kind, ns, name in targets:
            try:
                obj = api.delete(store, kind, ns, name, grace_period=grace)
            except api.ApiError as e:
                print(_server_error(e), file=sys.stderr)
                failed = True
                continue
            # kubectl prints this once the API server accepted the delete; with
            # --wait it then blocks until the object is gone.
            word = "force deleted" if grace == 0 else "deleted"
            print(f'{kinds.BY_KIND[kind].word} "{name}" {word}')
            deleted.append((kind, ns, name, obj["metadata"].get("uid")))
        if args.wait:
            for kind, ns, name, uid in deleted:
                if not wait_gone(store, kind, ns, name, uid, args.timeout):
                    print(f"error: timed out waiting for the condition on {kinds.BY_KIND[kind].qualified()}/{name}",
                          file=sys.stderr)
                    failed = True
        return 1 if failed else 0
    finally:
        store.close()


def wait_gone(store, kind: str, namespace: str | None, name: str, uid: str | None, timeout: float) -> bool:
    """Wait until the object of that UID is no longer in the store: for a pod on a
    node, until its kubelet has stopped the containers, torn down the sandbox
    and removed the key. A new object of the same name (a StatefulSet would
    make one; a user may) does not count as the old one."""
    deadline = time.monotonic() + timeout
    while True:
        obj = registry.get(store, kind, namespace, name)
        if obj is None or (uid is not None and obj["metadata"].get("uid") != uid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def cmd_expose(args) -> int:
    kind, name = _kind_name(args.kind, args.name, "expose")
    cluster, store = _open(args)
    try:
        from netemu import clusterconfig
        settings = clusterconfig.read(cluster, store).settings
        try:
            svc = kubectl_verbs.expose(store, kind, name, args.port, args.target_port, args.type,
                                       args.service_name, args.protocol, namespace=args.namespace or "default",
                                       settings=settings)
        except api.ApiError as e:
            print(_server_error(e), file=sys.stderr)
            return 1
        print(f"service/{svc['metadata']['name']} exposed")
        return 0
    finally:
        store.close()


def cmd_scale(args) -> int:
    kind, name = _kind_name(args.kind, args.name, "scale")
    cluster, store = _open(args)
    try:
        from netemu import clusterconfig
        try:
            kubectl_verbs.scale(store, kind, name, args.replicas, namespace=args.namespace or "default",
                                settings=clusterconfig.read(cluster, store).settings)
        except api.ApiError as e:
            print(_server_error(e), file=sys.stderr)
            return 1
        print(f"{kinds.BY_KIND[kind].ref(name)} scaled")
        return 0
    finally:
        store.close()


def cmd_label(args) -> int:
    if "/" in args.kind:
        kind, name = _kind_name(args.kind, None, "label")
        changes = args.rest
    else:
        kind, name, changes = _kind(args.kind), args.rest[0], args.rest[1:]
    if not changes:
        raise WorkloadCliError("at least one label update is required (KEY=VALUE or KEY-)")
    cluster, store = _open(args)
    try:
        from netemu import clusterconfig
        try:
            _, changed = kubectl_verbs.label(store, kind, name, changes, overwrite=args.overwrite,
                                             namespace=args.namespace or "default",
                                             settings=clusterconfig.read(cluster, store).settings)
        except api.ApiError as e:
            print(_server_error(e), file=sys.stderr)
            return 1
        only_removals = all(c.endswith("-") and "=" not in c for c in changes)
        word = "not labeled" if not changed else ("unlabeled" if only_removals else "labeled")
        print(f"{kinds.BY_KIND[kind].ref(name)} {word}")
        return 0
    finally:
        store.close()
