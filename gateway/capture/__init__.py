"""Diagnostic capture: per tenant and off by default, a redacted record of a request and its answer,
stored beside the ledger (same database, own table) and deleted after the tenant's retention."""
