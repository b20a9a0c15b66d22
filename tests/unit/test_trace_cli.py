"""The capture verbs' argument handling (netemu.capture.cli), without a cluster."""

import argparse

import pytest

from netemu.capture import cli as capture_cli


def parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()

    def verb(name, func, help_, root=True):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(func=func, needs_root=root)
        return sp

    def with_cluster(sp):
        sp.add_argument("--cluster")
        return sp

    capture_cli.register(sub, verb, with_cluster)
    return p


@pytest.mark.parametrize("argv", [
    ["capture", "n1", "udp", "port", "8285", "--duration", "3", "--cluster", "x"],
    ["capture", "n1", "--duration", "3", "--cluster", "x", "--", "udp", "port", "8285"],
    ["capture", "--cluster", "x", "n1", "--duration", "3", "udp", "port", "8285"],
])
def test_capture_options_anywhere_filter_words_kept(argv):
    args = parser().parse_args(argv)
    capture_cli.split_filter(args)
    assert (args.target, args.filter, args.duration, args.cluster) == ("n1", ["udp", "port", "8285"], 3.0, "x")


def test_capture_rejects_unknown_option_in_filter():
    args = parser().parse_args(["capture", "n1", "udp", "--bogus"])
    with pytest.raises(capture_cli.CaptureCliError):
        capture_cli.split_filter(args)


def test_decode_needs_no_root_and_trace_defaults():
    p = parser()
    assert p.parse_args(["decode", "f.pcap"]).needs_root is False
    a = p.parse_args(["trace", "a", "b"])
    assert (a.proto, a.port, a.output, a.needs_root) == ("tcp", None, None, True)


@pytest.mark.parametrize("argv,promiscuous", [
    (["capture", "n1", "udp"], True),
    (["capture", "n1", "-p", "udp"], False),
    (["capture", "n1", "udp", "--no-promiscuous-mode"], False),
])
def test_capture_promiscuous_mode_is_tcpdumps_default_and_p_turns_it_off(argv, promiscuous):
    from netemu.capture import tcpdump

    args = parser().parse_args(argv)
    capture_cli.split_filter(args)
    assert args.promiscuous is promiscuous and args.filter == ["udp"]
    assert ("-p" in tcpdump.tcpdump_argv("docker0", None, args.filter, promiscuous=args.promiscuous)) \
        is not promiscuous
