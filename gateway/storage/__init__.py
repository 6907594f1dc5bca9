"""What the ledger and the capture store share about their database: one URL syntax, one schema with
its migrations, and the SQLite and PostgreSQL plumbing both use. Both stores live in the same database
(capture is a table beside the ledger), so these live once, below both, and import only the foundation."""
