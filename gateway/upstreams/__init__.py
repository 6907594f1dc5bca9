"""Upstream adapters: they know HTTP and wire formats, nothing of tenants or policies."""
