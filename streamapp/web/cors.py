"""CORS for the ingest endpoint only (applied by streamapp.web.IngestView): pages on other origins may
POST events, nothing else.

Every answer of `/api/events` carries the CORS headers (errors included, so a tracker can read a
422's per-event errors and a 429's `Retry-After`). An origin outside `STREAMAPP_CORS_ORIGINS` gets
403 on preflight and on the POST itself: text/plain POSTs are "simple requests" that a browser
sends without asking first, so refusing only preflights would not keep them out.
"""

from __future__ import annotations

from aiohttp import web

ALLOW_METHODS = "POST, OPTIONS"
ALLOW_HEADERS = "Content-Type, Content-Encoding, X-Write-Key"
EXPOSE_HEADERS = "Retry-After"
MAX_AGE = "7200"  # Chromium's cap: longer is ignored


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allowed(self, origin: str | None) -> bool:
        """No Origin header (server to server, curl) is not a browser request: CORS does not apply."""
        return origin is None or self.any or origin in self.origins

    def headers(self, origin: str | None) -> dict[str, str]:
        if origin is None:
            return {}
        if self.any:
            return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": EXPOSE_HEADERS}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSE_HEADERS,
            "Vary": "Origin",
        }

    def refuse(self, origin: str) -> web.Response:
        return web.json_response(
            {"error": f"origin {origin!r} may not send events here (STREAMAPP_CORS_ORIGINS)"},
            status=403,
            headers={"Vary": "Origin"},
        )

    async def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not self.allowed(origin):
            return self.refuse(origin or "")
        headers = self.headers(origin)
        headers.update(
            {
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": MAX_AGE,
            }
        )
        return web.Response(status=204, headers=headers)
