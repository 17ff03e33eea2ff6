"""A request refused by the ingress: the HTTP status and OpenAI-shaped message to answer."""

from __future__ import annotations


class ClientError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
