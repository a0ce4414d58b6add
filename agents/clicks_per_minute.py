"""Clicks per page per minute, by event time, into `events.clicks_per_minute`, exactly once."""

from models.click import ClickEvent
from streamapp import app, count, distinct


@app.agent(app.stream(ClickEvent), name="clicks_per_minute")
async def clicks_per_minute(stream):
    await (
        stream.group_by(lambda e: e.page_url, column="page_url")
        .tumbling(60)
        .aggregate("events.clicks_per_minute", clicks=count(), unique_users=distinct(lambda e: e.user_id))
    )
