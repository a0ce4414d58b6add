"""A mouse click: where on the page (x, y in CSS pixels) and which button (0 = main)."""

from typing import Annotated

import msgspec

from streamapp.model import Event, Int32


class ClickEvent(Event, tag="click"):
    table = "events.clicks"

    x: Int32
    y: Int32
    button: Annotated[int, msgspec.Meta(ge=0, le=4)] = 0
