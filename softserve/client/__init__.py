"""Python client for Softserve (sync `Client` and `AsyncClient`), for internal services.

    from softserve.client import Client

    with Client("http://127.0.0.1:8000", api_key="sk-ss-...") as ss:
        out = ss.complete("my-task", "The capital of France is", max_tokens=16, temperature=0)
        print(out.choices[0].text)
        for delta in ss.stream_chat("my-task", [{"role": "user", "content": "Hi"}], max_tokens=32):
            print(delta, end="")
        ss.prompts.push("./my-adapter", "my-task", description="second version")

- One implementation: every method is an operation written once (softserve/client/methods.py) that a
  sync or an async runner executes (softserve/client/transport.py). `AsyncClient` has the same methods,
  awaitable; its streams are async iterators.
- Results are the server's own pydantic response models (`softserve.api.schemas`), so the client and
  the server cannot drift; unknown extra fields are ignored.
- Retries: 429 and 503 answers and connection failures (the request never reached the server) are
  retried with exponential backoff and jitter, honouring `Retry-After`. Other 4xx/5xx are never
  retried. Every call accepts `timeout=` (seconds or `httpx.Timeout`) and `request_id=`.
- Every generation request carries `X-Softserve-Prompt: <model>` (affinity routing: a router can
  send one prompt's traffic to the replica whose KV prefix cache already holds it) and every request
  carries `X-Request-ID` (a uuid4 unless given; the same id on each retry of one call).
- Errors raise `SoftserveError` subclasses parsed from the OpenAI error shape
  `{"error": {"message", "type", "param", "code"}}`, including errors sent inside an SSE stream.
- Listings (`prompts.list`, `tuning.list`) follow every page.

Importing or using the client needs only httpx and pydantic (never torch or fastapi: a test checks it).
$SOFTSERVE_URL and $SOFTSERVE_API_KEY are read through `softserve.config.ClientSettings` when a
client is made.
"""

from softserve.api.schemas import ChatCompletionResponse, CompletionResponse, ModelList

from .errors import (APIConnectionError, APITimeoutError, AuthenticationError, BadRequestError, ConflictError,
                     InternalServerError, NotFoundError, PayloadTooLargeError, PermissionDeniedError, RateLimitError,
                     ServiceUnavailableError, SoftserveError, UnprocessableEntityError)
from .methods import AsyncClient, Client, Prompts, Tuning
from .transport import RetryPolicy

__all__ = [
    "Client", "AsyncClient", "Prompts", "Tuning", "RetryPolicy",
    "SoftserveError", "APIConnectionError", "APITimeoutError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "UnprocessableEntityError",
    "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "CompletionResponse", "ChatCompletionResponse", "ModelList",
]
