"""HTTP front ends: raw ASGI handlers that speak each client's wire format."""
