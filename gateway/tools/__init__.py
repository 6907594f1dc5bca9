"""Tool calling across dialects: tool schemas in (every shape clients send), tool calls out (ids,
types, JSON-string arguments, well-formed stream deltas, raw K2 marker sections, legacy
``function_call``).

Nothing here runs for a request without ``tools`` or ``functions``, so plain chat traffic keeps its
byte relay.
"""
