"""kimi-gateway: an OpenAI-compatible proxy gateway and cost router for Kimi K2 Thinking."""

__version__ = "0.1.0"
