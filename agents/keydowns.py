"""Raw keydown sink: every accepted key press into `events.keydowns`."""

from models.keydown import KeydownEvent
from streamapp import app


@app.agent(app.stream(KeydownEvent), name="keydowns")
async def keydowns(stream):
    async for window in stream.take(app.settings.window_count, within=app.settings.window_seconds):
        await app.table(KeydownEvent.table).append(window)
