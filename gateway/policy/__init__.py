"""Tenant policies: who may call, which virtual models they see, and how each is served."""
