"""Reasoning governance: what a tenant's clients see of K2's reasoning, and keeping tool loops whole.

``think_tags`` splits ``<think>`` text out of content, ``redact`` finds secrets, ``modes`` is the
response transform (pass with a renamed field, strip, redact), ``store`` keeps the reasoning of
tool-call turns for the next request, ``inbound`` puts it back before the request goes upstream.
"""
