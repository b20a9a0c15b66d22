#!/usr/bin/env python3
"""Benchmark the overlay backends without the netemu command (same as `netemu bench`).

    sudo .venv/bin/python tools/bench_overlay.py [--backends udp,vxlan,host-gw] [--rounds N]
         [--duration S] [--mtu M] [--tests ...] [-o DIR]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from netemu.bench import cli  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench_overlay")
    sub = parser.add_subparsers(dest="verb")

    def verb(name, func, help_, root=True):
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(func=func)
        return sp

    cli.register(sub, verb, lambda sp: sp)
    args = parser.parse_args(["bench", *sys.argv[1:]])
    try:
        return args.func(args)
    except ValueError as e:
        print(f"bench_overlay: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
