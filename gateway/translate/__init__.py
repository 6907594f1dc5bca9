"""Other front-end dialects translated to and from chat/completions (upstreams speak only that)."""
