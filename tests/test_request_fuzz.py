"""Property-based fuzz of forward requests sent to a real DeviceActor on a real Ray.

Requests vary in shape (0-d .. 3-d, wrong widths, zero rows, more rows than the device takes in one
call or than its queue holds), in type (float16/32/64, ints, bool, complex, object arrays, nested
lists, ragged lists, None, strings, torch tensors incl. bfloat16) and in values (NaN/+-inf anywhere,
values outside the input or parameter range). An independent oracle below says whether a request is
valid. Every invalid one must be refused with an error naming the field (x, theta or the queue
limit) before the system sees it (the actor's device call count does not move), valid ones must be
answered with y[rows, n_outputs] in ceil(rows / max_rows) device calls (an oversized batch is split,
not refused, up to max_queue_rows), and the actor must stay healthy throughout.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.errors import DeviceBusyError, EnvelopeError
from farm.config import DeviceConfig
from farm.pool import start_device, stop_device

N = 8  # oscillators: x[rows, 8], theta[8*8 + 8 = 72], y[rows, 8]
N_PARAMS = N * N + N
X_RANGE, THETA_RANGE = (-1.0, 1.0), (-2.0, 2.0)
MAX_ROWS = 16  # rows per device call: larger requests are split into calls of at most 16 rows
MAX_QUEUE_ROWS = 64  # rows one request may bring at most; beyond, refused (DeviceBusyError)
NAME = "fuzz-osc"


@pytest.fixture(scope="module")
def device(ray_session):
    (handle,) = start_device(DeviceConfig(
        name=NAME, system={"kind": "oscillators", "n": N, "seed": 0, "max_rows": MAX_ROWS},
        max_queue_rows=MAX_QUEUE_ROWS))
    yield handle
    stop_device(NAME)


# -- requests ------------------------------------------------------------------------------------------
DTYPES = ["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "object"]
SPECIALS = [math.nan, math.inf, -math.inf, 1.5, -7.0, 3.0, 1e30]


@st.composite
def arrays(draw, width: int, rng: tuple[float, float], rows_axis: bool):
    """Mostly near-valid numpy arrays for one field, with one thing possibly wrong."""
    if rows_axis:
        rows = draw(st.one_of(st.integers(1, 5), st.integers(0, 2 * MAX_QUEUE_ROWS), st.just(0)))
        shape = draw(st.one_of(
            st.just((rows, width)), st.just((rows, width)), st.just((rows, width)),
            st.sampled_from([(), (width,), (rows, width + 1), (rows, width - 1), (1, rows, width), (width, rows)]),
        ))
    else:
        shape = draw(st.one_of(st.just((width,)), st.just((width,)), st.just((width,)),
                               st.sampled_from([(), (width - 1,), (width + 1,), (1, width), (2, width), (0,)])))
    dtype = draw(st.sampled_from(DTYPES[:3] * 3 + DTYPES))
    lo, hi = rng
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype in ("int64", "int32", "uint8"):
        values = gen.integers(max(0, int(lo)) if dtype == "uint8" else int(lo), int(hi) + 1, size=shape)
    else:
        values = gen.uniform(lo, hi, size=shape)
    arr = values.astype(dtype)
    n = arr.size
    if n and draw(st.booleans()) and dtype not in ("bool", "object"):
        i = draw(st.integers(0, n - 1))
        special = draw(st.sampled_from(SPECIALS))
        if arr.dtype.kind in "iu":
            special = int(special) if math.isfinite(special) and abs(special) < 100 else 5
            if arr.dtype.kind == "u":
                special = abs(special)
        arr.reshape(-1)[i] = special
    return arr


def as_other_type(arr: np.ndarray, how: str):
    """The same values sent as another Python type."""
    if how == "list":
        return arr.tolist()
    if how == "torch" and arr.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if how == "bfloat16" and arr.dtype.kind == "f":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    return arr


JUNK = st.sampled_from([None, "0.5", "", b"\x00\x01", {"x": 1}, [[0.1] * N, [0.1] * (N - 1)], [[None] * N],
                        [["a"] * N], 3.0, True, object()])


@st.composite
def requests(draw):
    x = draw(arrays(N, X_RANGE, rows_axis=True))
    theta = draw(arrays(N_PARAMS, THETA_RANGE, rows_axis=False))
    x = as_other_type(x, draw(st.sampled_from(["numpy"] * 4 + ["list", "torch", "bfloat16"])))
    theta = as_other_type(theta, draw(st.sampled_from(["numpy"] * 4 + ["list", "torch", "bfloat16"])))
    junk = draw(st.sampled_from(["none"] * 8 + ["x", "theta"]))
    if junk == "x":
        x = draw(JUNK)
    elif junk == "theta":
        theta = draw(JUNK)
    return x, theta


# -- the oracle: written from the spec, not from actors/envelope.py ----------------------------------------
def verdict(value, shape_ok, rng) -> str | None:
    """None if `value` is an acceptable field, else a short reason."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            return "dtype"
        value = value.float().numpy()
    if value is None or isinstance(value, (str, bytes, dict, bool)):
        return "type"
    try:
        arr = np.asarray(value)
    except ValueError:
        return "ragged"
    if arr.dtype.kind not in "fiu":
        return "dtype"
    if not shape_ok(arr.shape):
        return "shape"
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        return "non-finite"
    if arr.size and (arr.min() < rng[0] or arr.max() > rng[1]):
        return "range"
    return None


def expected(x, theta) -> tuple[set[str], int]:
    """(the fields a refusal may name: empty if the request is valid, rows if x is valid)."""
    why_x = verdict(x, lambda s: len(s) == 2 and s[1] == N and s[0] >= 1, X_RANGE)
    why_theta = verdict(theta, lambda s: s == (N_PARAMS,), THETA_RANGE)
    rows = int(np.shape(x)[0]) if why_x is None else 0
    bad = {f for f, why in (("x", why_x), ("theta", why_theta)) if why}
    if not bad and rows > MAX_QUEUE_ROWS:
        bad = {"max_queue_rows"}
    return bad, rows


def send(handle, x, theta):
    return ray.get(handle.forward.remote(x, theta, "fuzzer"), timeout=60)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_fuzzed_requests_are_refused_before_the_device_or_served(device, req):
    x, theta = req
    refused, rows = expected(x, theta)
    before = ray.get(device.stats.remote())
    if not refused:
        y = send(device, x, theta)
        assert y.shape == (rows, N) and y.dtype == np.float32 and np.isfinite(y).all()
        after = ray.get(device.stats.remote())
        assert after["calls"] - before["calls"] == math.ceil(rows / MAX_ROWS)  # oversized: split, in order
        assert after["refused"] == before["refused"]
    else:
        with pytest.raises((EnvelopeError, DeviceBusyError)) as err:
            send(device, x, theta)
        msg = str(err.value).strip().splitlines()[-1]
        assert f"{NAME}#0" in msg, msg  # the replica that refused
        if refused == {"max_queue_rows"}:
            assert isinstance(err.value, DeviceBusyError) and f"max_queue_rows={MAX_QUEUE_ROWS}" in msg \
                and f"{rows} rows" in msg, msg
        else:
            assert isinstance(err.value, EnvelopeError), msg
            named = {f for f in ("x", "theta") if f": {f} " in msg}
            assert named and named <= refused, f"expected one of {sorted(refused)} named: {msg}"
        after = ray.get(device.stats.remote())
        assert after["calls"] == before["calls"], "a refused request reached the device"
        assert after["refused"] == before["refused"] + 1 and after["errors"] == before["errors"]
    assert ray.get(device.ping.remote(), timeout=10) == "pong"


def test_actor_serves_normally_after_the_fuzz(device):
    """Run after the fuzz (same module-scoped actor): still healthy, nothing queued or stuck."""
    x = np.full((3, N), 0.25, np.float32)
    theta = np.zeros(N_PARAMS, np.float32)
    assert send(device, x, theta).shape == (3, N)
    stats = ray.get(device.stats.remote())
    assert stats["queued_rows"] == 0 and stats["queued_requests"] == 0 and not stats["in_call"]
    assert stats["errors"] == 0  # refusals are not device errors


def test_oversized_batch_is_split_up_to_the_queue_limit_and_refused_beyond(device):
    theta = np.zeros(N_PARAMS, np.float32)
    x = np.linspace(-1, 1, MAX_QUEUE_ROWS * N, dtype=np.float32).reshape(MAX_QUEUE_ROWS, N)
    calls = ray.get(device.stats.remote())["calls"]
    y = send(device, x, theta)
    assert y.shape == (MAX_QUEUE_ROWS, N)
    assert ray.get(device.stats.remote())["calls"] - calls == MAX_QUEUE_ROWS // MAX_ROWS
    with pytest.raises(DeviceBusyError, match=rf"request of {MAX_QUEUE_ROWS + 1} rows can never fit .*"
                                              rf"max_queue_rows={MAX_QUEUE_ROWS}"):
        send(device, np.zeros((MAX_QUEUE_ROWS + 1, N), np.float32), theta)
