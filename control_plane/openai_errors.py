"""OpenAI's error body, the one shape every error the gateway answers has.

Made here for every answer the control plane writes or configures: the admin API's, the
answers Envoy makes itself (builders/local_replies.py), the routes' own (builders/routes.py) and
the plain-HTTP refusal (builders/listener.py). The Lua filter builds the same body at request
time (`reply` in envoy/openai_errors.lua); tests/test_names_agree.py holds the two to one shape.
"""

from __future__ import annotations


def openai_error(message: str, error_type: str, param: str | None, code: int | str | None) -> dict:
    """{"error": {message, type, param, code}}: `param` the request field at fault (None: none),
    `code` the status unless OpenAI names one (invalid_api_key, rate_limit_exceeded)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
