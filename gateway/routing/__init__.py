"""Per-request routing: which candidate serves a request, in what order to fall back, and why."""
