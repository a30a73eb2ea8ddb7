"""Quotas of device-seconds per user and group (actors/quotas.py): on a fake clock, then on a real
Ray (refused before the device, not retried, charged from the audit log across a restart), then a
sweep whose trial hits its quota: FAILED with the message in MLflow, its earlier epochs kept."""
from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from actors.audit import read
from actors.errors import QuotaExceededError
from actors.quotas import QuotaBook, period_bounds
from farm.client import DeviceClient
from farm.config import DeviceConfig, parse_config
from farm.errors import ConfigError
from farm.pool import find_device, start_device, stop_device

NOON = datetime(2026, 12, 3, 12, 0).timestamp()


class Clock:
    def __init__(self, t: float = NOON):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_request_that_would_overrun_is_refused_naming_quota_use_and_renewal():
    clock = Clock()
    book = QuotaBook("optics", {"period": "day", "users": {"bob": 10.0}}, wall=clock)
    assert book.admit("alice", 1000) == 0.0  # no limit for alice: nothing to estimate
    est = book.admit("bob", 100)  # no call seen yet: free
    book.observe(1.0, 100)  # 10 ms per row
    book.settle("bob", est, 8.0)
    assert book.admit("bob", 100) == pytest.approx(1.0)  # 8 + 1 <= 10: waits, held against the quota
    with pytest.raises(QuotaExceededError) as err:
        book.admit("bob", 150)  # 8 used + 1 waiting + 1.5 > 10
    msg = str(err.value)
    assert "quota exceeded for user 'bob': users.bob allows 10 device-seconds per day, used 8.00 s so far" in msg
    assert "+ 1.00 s of requests waiting" in msg and "renews at 2026-12-04 00:00" in msg
    assert book.refused == 1
    clock.t = datetime(2026, 12, 4, 0, 0, 1).timestamp()  # the next day: renewed
    assert book.admit("bob", 150) == pytest.approx(1.5)


def test_groups_sum_their_members_and_default_applies_to_the_unnamed():
    book = QuotaBook("optics", {"period": "hour", "users": {"carol": 100.0}, "default_s": 5.0,
                                "groups": {"students": {"members": ["carol", "dave"], "device_s": 6.0}}},
                     wall=Clock())
    book.observe(0.1, 1)
    book.settle("carol", 0.0, 4.0)
    book.settle("dave", 0.0, 1.5)
    with pytest.raises(QuotaExceededError, match="groups.students allows 6 device-seconds per hour, used 5.50 s"):
        book.admit("dave", 10)  # dave's own default (5) is not reached, the group's is
    with pytest.raises(QuotaExceededError, match="default_s allows 5"):
        book.admit("erin", 51)
    start, renews = period_bounds("week", NOON)
    assert datetime.fromtimestamp(start).weekday() == 0 and renews - start == pytest.approx(7 * 86400, abs=3600)


def test_use_is_charged_from_the_audit_records_of_this_period_only():
    book = QuotaBook("optics", {"users": {"bob": 10.0}}, wall=Clock())
    book.load([{"t": NOON - 3600, "user": "bob", "outcome": "ok", "device_s": 4.0},
               {"t": NOON - 86400, "user": "bob", "outcome": "ok", "device_s": 50.0},  # yesterday
               {"t": NOON - 60, "user": "bob", "outcome": "refused: x", "device_s": 0.0}])
    assert book.used == {"bob": pytest.approx(4.0)}


def test_a_bad_quota_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"devices\[0\]\.quotas\.users.*must be > 0"):
        parse_config({"devices": [{"name": "o", "system": {"kind": "oscillators"}, "quotas": {"users": {"bob": 0}}}]})
    with pytest.raises(ConfigError, match=r"devices\[0\]\.quotas\.period"):
        parse_config({"devices": [{"name": "o", "system": {"kind": "oscillators"}, "quotas": {"period": "month"}}]})


# -- on a real Ray ------------------------------------------------------------------------------------
N = 4
X, THETA = np.zeros((8, N), np.float32), np.zeros(N * N + N, np.float32)


@pytest.fixture(scope="module")
def quota_device(ray_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("quota")
    handles = start_device(DeviceConfig(
        name="quo", system={"kind": "oscillators", "n": N, "latency_call_s": 0.02}, max_restarts=2,
        audit_dir=str(folder), quotas={"users": {"bob": 0.1}}))
    yield folder
    del handles
    stop_device("quo")


def test_refused_before_the_device_not_retried_and_charged_across_a_restart(quota_device):
    bob = DeviceClient("quo", client_id="bob/nb", user="bob").connect()
    alice = DeviceClient("quo", client_id="alice/nb", user="alice").connect()
    served = 0
    with pytest.raises(QuotaExceededError, match="quota exceeded for user 'bob': users.bob allows 0.1"):
        for _ in range(100):  # 20 ms per call: about 5 calls fit in 0.1 s
            bob.forward(X, THETA)
            served += 1
    # each call takes at least its 20 ms (more on a loaded machine): at most 5 fit, and at least one
    assert 1 <= served <= 6 and bob.retried == 0
    assert alice.forward(X, THETA).shape == (8, N)  # no limit for alice
    recs = [r for r in read(quota_device / "quo.0.jsonl") if "event" not in r]
    refused = [r for r in recs if r["outcome"].startswith("refused: QuotaExceededError")]
    assert len(refused) == 1 and refused[0]["user"] == "bob"
    charged = sum(r["device_s"] for r in recs if r["user"] == "bob" and r["outcome"] == "ok")
    assert charged <= 0.1 + 0.03  # at most one call's estimate over
    longest = max(r["device_s"] for r in recs if r["user"] == "bob" and r["outcome"] == "ok")
    assert charged >= 0.1 - 2 * longest  # refused only once the next call would overrun, not earlier
    handle = find_device("quo")
    ray.kill(handle, no_restart=False)
    again = DeviceClient("quo", client_id="bob/nb2", user="bob", restart_wait_s=60).connect()
    with pytest.raises(QuotaExceededError):  # the restarted actor charged bob from the audit log
        again.forward(X, THETA)
    quota = ray.get(handle.stats.remote())["quota"]
    assert quota["used"]["bob"] == pytest.approx(charged) and quota["period"] == "day"


def test_a_trial_that_hits_its_quota_ends_failed_with_the_message_in_mlflow(ray_session, tmp_path, sqlite_uri):
    from farm.sweep import run_sweep

    cfg = parse_config({
        "devices": [{"name": "quo-sweep", "system": {"kind": "oscillators", "n": 16, "latency_call_s": 0.05},
                     "audit_dir": str(tmp_path / "audit"), "quotas": {"users": {"erin": 0.6}}}],
        "data": {"kind": "digits", "limit": 200},
        "train": {"method": "pat", "device": "quo-sweep", "epochs": 4, "batch_size": 32,
                  "encoder": {"kind": "downsample", "size": [4, 4]}},
        "sweep": {"name": "quota", "trial_cpus": 1, "storage_path": str(tmp_path / "ray_results")},
        "tracking": {"experiment": "quota", "user": "erin"},
    })
    outcome = run_sweep(cfg, tracking_uri=sqlite_uri)
    assert [r.status for r in outcome.rows] == ["ERROR"]
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("quota")
    trial = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("physfarm.kind") == "trial")
    assert trial.info.status == "FAILED"
    assert "quota exceeded for user 'erin': users.erin allows 0.6 device-seconds per day" in trial.data.tags["physfarm.error"]
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "loss")]  # its epochs before are kept
    refusals = [r for r in read(tmp_path / "audit" / "quo-sweep.0.jsonl") if r.get("outcome", "").startswith("refused")]
    assert len(refusals) == 1  # Tune's retries of the trial did not ask the device again
