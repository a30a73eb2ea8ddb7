"""The instrument client's config (`kind: instrument`): pydantic only, no torch, so that a sweep config
naming an instrument is validated without importing the client."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from . import protocol as P


class InstrumentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["instrument"] = "instrument"
    host: str = Field(default="127.0.0.1", description="instrument server address")
    port: int = Field(default=5555, ge=1, le=65535)
    token: str | None = Field(default=None, description="shared secret sent in HELLO")
    connect_timeout_s: float = Field(default=5.0, gt=0.0, description="per connection attempt")
    read_timeout_s: float = Field(default=30.0, gt=0.0, description="longest wait for one reply")
    retries: int = Field(default=3, ge=0, le=100, description="reconnect attempts after the first")
    backoff_s: float = Field(default=0.2, ge=0.0, description="first wait between attempts (doubles)")
    backoff_max_s: float = Field(default=5.0, ge=0.0, description="longest wait between attempts")
    max_frame_bytes: int = Field(default=P.DEFAULT_MAX_FRAME_BYTES, ge=1024, description="largest reply accepted")
    expect_spec: dict | None = Field(default=None, description="the spec the server must report "
                                     "(lets `spec` answer before connecting; checked on connect)")
    twin_system: dict | None = Field(default=None, description="simulator config whose ideal_model() "
                                     "is this instrument's nominal model")
    client_name: str = Field(default="physfarm", description="sent in HELLO (shows in server logs)")
