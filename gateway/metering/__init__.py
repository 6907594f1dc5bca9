"""Metering: what each request cost, and the ledger that keeps it.

Token counting (``tokens``, ``usage``, ``stream``) and prices (``prices``) turn a response into a cost;
``money`` keeps that cost exact (Decimal, rounded once to the nanodollar); ``ledger`` records one row
per request off the request path, in SQLite or PostgreSQL (``ledger_sqlite``, ``ledger_postgres``);
``report`` turns the ledger's aggregates into CSV, JSON and tables for finance.
"""
