"""Features from logs and the Feast store around them.

- ``schema``: the feature contract (views, columns, cold-start defaults)
- ``build``: feature tables from a log directory, point-in-time correct, as Parquet the offline store reads
- ``store``: apply, materialise, and point-in-time training sets through Feast
- ``client``: online reads for serving, with cold-start and degraded fallbacks

Feast is imported lazily inside ``store`` and ``client`` only, so the core package imports without it.
"""
