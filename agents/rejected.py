"""Rejected-event sink: what the collector refused, with the reason, into `events.rejected`."""

from streamapp import Rejected, app


@app.agent(app.stream(Rejected), name="rejected")
async def rejected(stream):
    async for window in stream.take(app.settings.window_count, within=app.settings.window_seconds):
        await app.table(Rejected.table).append(window)
