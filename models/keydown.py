"""A key press: the key value and physical code, with the modifier state at that moment."""

from streamapp.model import Event


class KeydownEvent(Event, tag="keydown"):
    table = "events.keydowns"

    key: str
    code: str | None = None
    alt: bool = False
    ctrl: bool = False
    meta: bool = False
    shift: bool = False
    repeat: bool = False
