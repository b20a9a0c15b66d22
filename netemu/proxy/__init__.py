"""The service proxy (kube-proxy): DNAT rules that send service traffic to endpoints.

- model:     services + endpoints (API shape) -> service ports; kube-proxy's chain names
- nftables:  desired `ip kube-proxy` table, per-service fragments, nft transactions (pure)
- iptables:  per-service fragments, iptables-restore --noflush input for nat and filter (pure)
- libnft:    in-process libnftables runner (ctypes), `nft -f -` fallback
- conntrack: stale UDP conntrack entries deleted over ctnetlink (one dump, batched deletes)
- proxier:   NftablesProxier / IptablesProxier: keep per-service state, recompute and
             apply only changed services, clean up, then the stale UDP conntrack entries
- daemon:    the per-node process: store watch -> changed objects -> proxier
"""
