"""Shared state behind one interface: in-process memory by default, Redis across replicas."""
