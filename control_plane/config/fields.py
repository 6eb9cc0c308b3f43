"""The field types the sections share: each carries its bounds (control_plane/validation.py
checks them and names the failing key)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from control_plane.addresses import AddressError, parse_backend_url
from control_plane.validation import fail, matching, within
from control_plane.xds.snapshot import MAX_WEIGHT, MIN_WEIGHT

MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")  # use fullmatch
DNS_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
SECTION = ConfigDict(extra="forbid")
YAML_OFF = BeforeValidator(lambda v: "off" if v is False else v)  # YAML reads an unquoted `off` as false


def _backend_url(value: Any) -> str:
    try:
        return parse_backend_url(value)[0]
    except AddressError as error:
        fail(str(error))


def _host_port(value: Any) -> str:
    """`host:port` (`[v6]:port`) in one spelling; no scheme, no path."""
    if "://" in value:
        fail(f"{value!r}: expected host:port, without a scheme")
    try:
        return parse_backend_url("http://" + value)[0].removeprefix("http://")
    except AddressError as error:
        fail(str(error).replace("http://", "", 1))


Port = Annotated[StrictInt, within(1, 65535)]
HostPort = Annotated[StrictStr, AfterValidator(_host_port)]
Weight = Annotated[StrictInt, within(MIN_WEIGHT, MAX_WEIGHT)]
Count = Annotated[StrictInt, within(1, 1_000_000)]
_positive = AfterValidator(lambda v: v if v > 0 else fail(f"expected a positive number, got {v!r}"))
Positive = Annotated[StrictFloat, _positive]
PositiveInt = Annotated[StrictInt, _positive]
ModelName = Annotated[StrictStr, matching(MODEL_NAME_PATTERN, "{!r} is not a valid model name (1-128 characters: "
                                                               "letters, digits, . _ : / @ + -)")]
BackendUrl = Annotated[Any, AfterValidator(_backend_url)]
Address = Annotated[StrictStr, Field(min_length=1)]
DrainTimeout = Annotated[StrictFloat, within(1, 86400)]
RotationGrace = Annotated[StrictFloat, within(0, 30 * 86400)]


def seconds(low: float, high: float):
    return Annotated[StrictFloat, within(low, high)]


FilePath = Annotated[StrictStr, Field(min_length=1)]


EnvName = Annotated[StrictStr, matching(re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}"),
                                        "expected an environment variable's name, got {!r}")]
