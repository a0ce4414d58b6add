"""Raw click sink: every accepted click, windowed by count and time, into `events.clicks`."""

from models.click import ClickEvent
from streamapp import app


@app.agent(app.stream(ClickEvent), name="clicks")
async def clicks(stream):
    async for window in stream.take(app.settings.window_count, within=app.settings.window_seconds):
        await app.table(ClickEvent.table).append(window)
