"""netemu: a packet-level emulator of Kubernetes pod networking."""
