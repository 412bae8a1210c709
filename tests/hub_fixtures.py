"""Loopback Hub fixtures (filled by the runtime-cache work)."""
