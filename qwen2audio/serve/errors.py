"""Errors a client gets: an HTTP status and OpenAI's error body `{"error": {"message", "type", "param", "code"}}`."""

from ..errors import Qwen2AudioError

# OpenAI's `type` for each status this server returns.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server answers with an error; the message is shown to the client, so it never holds server
    paths, file contents or a traceback."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_library(error: Qwen2AudioError, param: str | None = None) -> APIError:
    """Our own exceptions name the problem without the input's bytes (audio.py, generate.py): safe to pass on."""
    return APIError(400, str(error), param, "invalid_value")
