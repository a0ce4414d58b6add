"""The stream engine: the `App` and its agents (`app`), the stream an agent reads and the windows
it takes (`stream`, over `reader`, which reads Redis), event-time windows and the watermark
(`windows`), keyed aggregates (`aggregations`, `aggregator`, `aggregate_loop`), and the worker
process that runs it all (`worker`)."""
