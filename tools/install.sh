#!/usr/bin/env bash
# Install what netemu needs on a Debian machine (run as root):
#   - Debian packages: iproute2, nftables (+ libnftables1), iptables, tcpdump,
#     iperf3, iputils-ping, curl, busybox (the web-server stand-in), conntrack,
#     strace (a test compares our nf_tables netlink batches with what nft sends),
#     gcc, libc6-dev and python3-dev (pip builds the udp fast path's C helper; without them
#     the package installs anyway and the fast path uses numpy, slower);
#   - Debian's etcd-server (3.4), the store of a cluster spread over several
#     machines and of the store contract tests; its system service is neither
#     started nor enabled (netemu and the tests start their own etcd on a free
#     loopback port with a data dir of their own);
#   - Debian's kubectl 1.20 (kubernetes-client, the tutorial's generation: it speaks
#     only SPDY for exec), extracted into ./.kubectl/1.20/kubectl for the API tests,
#     not installed and not on PATH (the package conflicts with the machine's kubectl);
#   - the Python package and its dependencies into a virtual environment at
#     ./.venv (next to this repository's setup.cfg), with `netemu` linked into
#     /usr/local/bin so that `sudo netemu ...` finds it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then echo "tools/install.sh: run as root (sudo)" >&2; exit 1; fi

packages="iproute2 nftables libnftables1 iptables tcpdump iperf3 iputils-ping curl busybox conntrack strace python3-venv python3-dev gcc libc6-dev"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# etcd-server: the package's postinst would start and enable etcd on 2379.
# A policy-rc.d that denies every start (unless one is there already) keeps
# it down during the install; then the service is disabled and masked, and
# stopped should anything have started it anyway.
if ! dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -q "install ok installed"; then
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null || true
  [ -n "$own_policy" ] && rm -f /usr/sbin/policy-rc.d
  if ! command -v etcd >/dev/null; then
    echo "tools/install.sh: etcd-server did not install; the etcd store tests will be skipped" >&2
  fi
fi
# etcdctl (Debian's etcd-client), to read a cluster's keys as flannel's users do:
# `etcdctl get --prefix /netemu/<cluster>/coreos.com/network`.
if ! command -v etcdctl >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-client >/dev/null || \
    echo "tools/install.sh: etcd-client did not install; etcdctl checks will be skipped" >&2
fi
if [ -e /lib/systemd/system/etcd.service ]; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
    systemctl mask etcd.service >/dev/null 2>&1 || true
  else
    rm -f /etc/systemd/system/multi-user.target.wants/etcd.service
    ln -sf /dev/null /etc/systemd/system/etcd.service
    [ -x /etc/init.d/etcd ] && /etc/init.d/etcd stop >/dev/null 2>&1 || true
  fi
fi
command -v update-rc.d >/dev/null && [ -e /etc/init.d/etcd ] && update-rc.d etcd disable >/dev/null 2>&1 || true

old_kubectl=.kubectl/1.20/kubectl
if [ ! -x "$old_kubectl" ]; then
  tmp=$(mktemp -d)
  fetch() { (cd "$tmp" && apt-get download -qq kubernetes-client) >/dev/null 2>&1; }
  if fetch || { apt-get update -qq && fetch; }; then
    dpkg -x "$tmp"/kubernetes-client_*.deb "$tmp/root"
    if "$tmp/root/usr/bin/kubectl" version --client 2>/dev/null | grep -q 'GitVersion:"v1\.20\.'; then
      mkdir -p "$(dirname "$old_kubectl")"
      install -m 0755 "$tmp/root/usr/bin/kubectl" "$old_kubectl"
    else
      echo "tools/install.sh: Debian's kubernetes-client is not kubectl 1.20 here; the 1.20 tests will be skipped" >&2
    fi
  else
    echo "tools/install.sh: apt-get download kubernetes-client failed; the kubectl 1.20 tests will be skipped" >&2
  fi
  rm -rf "$tmp"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
ln -sf "$PWD/.venv/bin/netemu" /usr/local/bin/netemu
echo "netemu installed: $(command -v netemu)"
