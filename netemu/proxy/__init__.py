"""The service proxy (kube-proxy): DNAT rules that send service traffic to endpoints.

- model:     services + endpoints (API shape) -> service ports; kube-proxy's chain names
- nftables:  desired `ip kube-proxy` table and incremental nft transactions (pure)
- iptables:  iptables-restore --noflush input for the nat and filter tables (pure)
- libnft:    in-process libnftables runner (ctypes), `nft -f -` fallback
- proxier:   NftablesProxier / IptablesProxier: apply, diff, clean up, flush UDP conntrack
"""
