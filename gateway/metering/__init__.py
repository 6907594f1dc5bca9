"""Metering: what each request cost, and the ledger that keeps it.

Token counting (``tokens``, ``usage``, ``stream``) and prices (``prices``) turn a response into a cost;
``money`` keeps that cost exact (Decimal, rounded once to the nanodollar); ``ledger`` records one row
per request off the request path: its entries are in ``ledger_rows``, the plan of a batch in
``ledger_batch``, the report query in ``ledger_query``, the backends in ``ledger_sqlite`` and
``ledger_postgres`` (their columns and encoders in ``*_columns``), and ``ledger_factory`` picks one by
URL; the schema both backends migrate is in :mod:`gateway.storage`. ``report`` turns the ledger's
aggregates into CSV, JSON and tables for finance.
"""
