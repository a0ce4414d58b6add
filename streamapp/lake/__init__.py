"""The lake: Iceberg tables and what writes them. The catalog and the tables (`catalog`), a
window's rows as Arrow (`columns`), the sinks that commit rows with their stream position
(`sink` for raw events, `aggregate_sink` for aggregates), the commit-with-retry both use
(`commit`), and the upkeep that keeps tables fast (`upkeep`).

Loaded by the worker and the commands, never by the web process (pyiceberg and pyarrow cost it
~35 MB of RSS)."""
