"""The live dashboard, `python -m streamapp dashboard`: its own process, so the ingest web process
never loads the lake. It may use the engine and the lake; nothing imports it."""
