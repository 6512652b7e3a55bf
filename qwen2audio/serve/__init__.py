"""`qwen2audio serve`: an OpenAI-compatible HTTP server with audio input and continuous batching.

    cli.py        the `serve` subcommand: its options, loading, starting uvicorn
    app.py        the Starlette app: routes, the API key, admission (queue, then 429), replies and streams
    bodies.py     request bodies read within the body limit, the multipart form, the event-stream response
    guard.py      Host and Origin checks: no other web site's page can use the server through a browser
    schema.py     the request schema: OpenAI's JSON checked field by field, turned into a prompt and options
    prompts.py    client audio decoded in a worker pool (strict AudioPolicy), then the processor's model inputs
    scheduler.py  the batch scheduler: one model thread that owns the batch KV cache
    shapes.py     OpenAI's response bodies and stream chunks
    errors.py     APIError: an HTTP status and OpenAI's error body

Nothing here is imported by the core package; the web dependencies are the `serve` extra.
"""
