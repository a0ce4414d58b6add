"""The HTTP edge: `POST /api/events` and its neighbours. The server and its routes (`server`), the
ingest view (`view`), what it reads of a request (`body`), validation against the models
(`ingest`), the group commit into Redis (`writer`), backpressure (`backlog`), CORS (`cors`),
several processes on one port (`processes`), the API description (`openapi`), and the browser
tracker (`static/`)."""
