"""Request and response transforms: what changes a request or answer beyond the model name.

Nothing here runs unless a tenant's policy or an upstream's configuration asks for it, so the
common path stays a byte-for-byte relay.
"""
