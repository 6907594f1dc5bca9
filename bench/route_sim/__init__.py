"""Routing benchmark: an agentic workload replayed through the real router in virtual time."""
