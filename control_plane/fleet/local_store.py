"""The state dir on this host: the state file, written atomically and durably before the API answers, and the admin token."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

DEFAULT_STATE_DIR = ".whisper-gateway"
TOKEN_ENV = "WHISPER_GATEWAY_ADMIN_TOKEN"
TOKEN_FILE_ENV = "WHISPER_GATEWAY_ADMIN_TOKEN_FILE"
STATE_DIR_ENV = "WHISPER_GATEWAY_STATE_DIR"


def state_dir(explicit: Path | None = None) -> Path:
    return Path(explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` so that a crash leaves either the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class StateStore:
    def __init__(self, directory: Path):
        self.path = directory / "state.json"

    def load(self) -> dict | None:
        """The saved state, None when there is none; a damaged file is an error, never ignored."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.path} is not valid JSON ({error}); fix or remove it") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} does not hold a JSON object; fix or remove it")
        return data

    def save(self, data: dict) -> None:
        write_atomically(self.path, json.dumps(data, indent=2, sort_keys=True).encode())


def configured_token() -> str | None:
    """The admin token from the environment (value, or a file holding it), if any."""
    token = None
    if os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    elif os.environ.get(TOKEN_FILE_ENV):
        token = Path(os.environ[TOKEN_FILE_ENV]).read_text().strip()
    return token or None  # a blank token is no token


def ensure_token(directory: Path) -> tuple[str, Path | None]:
    """The configured token, else the one generated into the state dir (made once, mode 0600)."""
    token = configured_token()
    if token:
        return token, None
    path = directory / "admin-token"
    if path.exists():
        return path.read_text().strip(), path
    token = secrets.token_urlsafe(32)
    write_atomically(path, token.encode(), mode=0o600)
    return token, path


def client_token(directory: Path) -> str | None:
    """What the CLI sends: the environment's token, else the one in the state dir."""
    token = configured_token()
    if token:
        return token
    path = directory / "admin-token"
    return path.read_text().strip() if path.exists() else None
