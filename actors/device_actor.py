"""`DeviceActor`: the Ray actor that owns one device and serves forward-pass requests.

Requests arrive as (x[B, n_inputs], theta[n_params], client). Each is checked against the envelope
before it is queued, so a bad request never reaches the device nor poisons a merged batch. A single
batcher task takes queued requests round-robin over clients (so a client sending huge batches cannot
starve the others) until the device's max rows, runs one device call in a worker thread (so `stats`
and `ping` never wait behind the device) and splits the result back per request, in order.
"""
from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .envelope import check_request
from .errors import DeviceError, EnvelopeError
from .systems.registry import build_system


@dataclass
class _Request:
    x: np.ndarray  # [rows, n_inputs] float32
    theta: np.ndarray  # [n_params] float32
    client: str
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class _ClientStats:
    requests: int = 0
    rows: int = 0
    wait_s: float = 0.0  # time requests spent queued before their device call started
    device_s: float = 0.0  # this client's share (by rows) of the busy time of the calls it was in


class DeviceActor:
    """Serve one device. Use as `ray.remote(DeviceActor)`; see `farm.pool` for how it is started."""

    def __init__(self, system_config: dict, name: str = "device", max_wait_s: float = 0.0,
                 max_queue_rows: int = 1_000_000):
        # Construct only: no I/O here. The system connects on the first request (or `connect()`).
        self.name = name
        self._system = build_system(system_config)
        self._spec = self._system.spec
        self._max_wait_s = max_wait_s
        self._max_queue_rows = max_queue_rows
        self._queues: "OrderedDict[str, deque[_Request]]" = OrderedDict()
        self._queued_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._connected = False
        self._calls = 0
        self._rows = 0
        self._requests = 0
        self._errors = 0
        self._refused = 0
        self._busy_s = 0.0
        self._first_request: float | None = None
        self._last_done: float | None = None
        self._clients: dict[str, _ClientStats] = {}

    # -- cheap methods: never queue behind device calls --------------------------------------------
    def ping(self) -> str:
        return "pong"

    def spec(self) -> dict:
        return self._spec.model_dump()

    def ideal_model(self) -> torch.nn.Module:
        """The nominal-physics model of this device (a differentiable twin to start from)."""
        return self._system.ideal_model()

    def stats(self) -> dict:
        now = time.monotonic()
        span = (now - self._first_request) if self._first_request is not None else 0.0
        return {
            "name": self.name,
            "system": self._spec.name,
            "calls": self._calls,
            "rows": self._rows,
            "requests": self._requests,
            "errors": self._errors,
            "refused": self._refused,
            "busy_s": self._busy_s,
            "span_s": span,
            "utilisation": self._busy_s / span if span > 0 else 0.0,
            "queued_rows": self._queued_rows,
            "queued_requests": sum(len(q) for q in self._queues.values()),
            "clients": {k: vars(v).copy() for k, v in self._clients.items()},
        }

    def reset_stats(self) -> None:
        self._calls = self._rows = self._requests = self._errors = self._refused = 0
        self._busy_s = 0.0
        self._first_request = None
        self._clients = {}

    async def connect(self) -> None:
        if not self._connected:
            await asyncio.to_thread(self._system.connect)
            self._connected = True

    # -- serving ------------------------------------------------------------------------------------
    async def forward(self, x, theta, client: str = "anonymous") -> np.ndarray:
        """Measure y[B, n_outputs] for x[B, n_inputs] with one parameter vector theta[n_params]."""
        try:
            x, theta = check_request(self._spec, x, theta, device=self.name, batched_theta=False)
        except EnvelopeError:
            self._refused += 1
            raise
        rows = x.shape[0]
        if self._queued_rows + rows > self._max_queue_rows:
            self._refused += 1
            raise DeviceError(
                f"device '{self.name}': queue full ({self._queued_rows} rows waiting, limit "
                f"{self._max_queue_rows}); retry later or add replicas"
            )
        if not self._connected:
            await self.connect()
        if self._first_request is None:
            self._first_request = time.monotonic()
        loop = asyncio.get_running_loop()
        # A request larger than the device's max rows is served as several chunks, in order.
        step = self._spec.max_rows
        chunks = [
            _Request(x[i : i + step], theta, client, loop.create_future()) for i in range(0, rows, step)
        ]
        queue = self._queues.setdefault(client, deque())
        queue.extend(chunks)
        self._queued_rows += rows
        self._ensure_batcher()
        self._wakeup.set()
        parts = await asyncio.gather(*(c.future for c in chunks))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def _ensure_batcher(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._serve())

    def _take_batch(self) -> list[_Request]:
        """Round-robin over clients, one request each per turn, until the next would exceed max rows."""
        batch: list[_Request] = []
        rows = 0
        limit = self._spec.max_rows
        while self._queues:
            progressed = False
            for client in list(self._queues):
                queue = self._queues[client]
                req = queue[0]
                if batch and rows + req.x.shape[0] > limit:
                    continue
                queue.popleft()
                batch.append(req)
                rows += req.x.shape[0]
                progressed = True
                if not queue:
                    del self._queues[client]
                if rows >= limit:
                    break
            if rows >= limit or not progressed:
                break
        if batch:
            # The clients served this turn go to the back of the line.
            for req in batch:
                if req.client in self._queues:
                    self._queues.move_to_end(req.client)
        self._queued_rows -= rows
        return batch

    async def _serve(self) -> None:
        while True:
            if not self._queues:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._max_wait_s > 0 and self._queued_rows < self._spec.max_rows:
                await asyncio.sleep(self._max_wait_s)  # let more requests join this call
            batch = self._take_batch()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[_Request]) -> None:
        sizes = [r.x.shape[0] for r in batch]
        x = torch.from_numpy(np.concatenate([r.x for r in batch], axis=0))
        theta = torch.from_numpy(
            np.concatenate([np.broadcast_to(r.theta, (n, r.theta.shape[0])) for r, n in zip(batch, sizes)])
        )
        start = time.monotonic()
        for r in batch:
            self._clients.setdefault(r.client, _ClientStats()).wait_s += start - r.enqueued
        try:
            y = await asyncio.to_thread(self._system.forward, x, theta)
            y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, np.float32)
        except Exception as exc:  # a device fault fails this call's requests only
            elapsed = time.monotonic() - start
            self._busy_s += elapsed
            self._errors += 1
            err = exc if isinstance(exc, DeviceError) else DeviceError(
                f"device '{self.name}': {type(exc).__name__}: {exc}")
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(err)
            return
        elapsed = time.monotonic() - start
        self._busy_s += elapsed
        self._calls += 1
        total = sum(sizes)
        self._rows += total
        offset = 0
        for r, n in zip(batch, sizes):
            stats = self._clients[r.client]
            stats.requests += 1
            stats.rows += n
            stats.device_s += elapsed * n / total
            self._requests += 1
            if not r.future.done():
                r.future.set_result(np.ascontiguousarray(y[offset : offset + n]))
            offset += n
        self._last_done = time.monotonic()
