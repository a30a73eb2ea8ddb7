"""The sweep's console (farm/console.py): the view is a pure object fed by Tune's events; on a
terminal it is redrawn in place (rich), elsewhere printed as plain lines now and then and once at
the end. No Ray: the events are called as Tune calls them."""
from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from farm.console import ConsoleCallback, DeviceLine, SweepView


def _trial(trial_id: str, lr: float):
    return SimpleNamespace(trial_id=trial_id, config={"train": {"lr": lr, "epochs": 3}})


def _describe(trial):
    return f"lr={trial.config['train']['lr']}", trial.config["train"]["epochs"]


def _run_events(callback: ConsoleCallback):
    a, b = _trial("t1", 0.03), _trial("t2", 0.1)
    callback.on_trial_start(0, [a, b], a)
    callback.on_trial_start(0, [a, b], b)
    callback.on_trial_result(1, [a, b], a, {"epoch": 1, "val_accuracy": 0.71, "device_s_total": 2.5})
    callback.on_trial_result(2, [a, b], b, {"epoch": 2, "val_accuracy": 0.8, "device_s_total": 4.0})
    callback.on_trial_complete(3, [a, b], a)
    callback.on_trial_error(4, [a, b], b)
    callback.on_experiment_end([a, b])


def test_plain_lines_name_each_trial_its_progress_and_the_devices():
    view = SweepView("sweep 'q'")
    out = io.StringIO()
    callback = ConsoleCallback(view, ["osc"], _describe, stream=out, live=False, print_every_s=1e9)
    view.devices["osc"].update({"rows": 100, "utilisation_recent": 0.5, "queued_rows": 7}, now=10.0)
    view.devices["osc"].update({"rows": 400, "utilisation_recent": 0.75, "queued_rows": 3}, now=12.0)
    _run_events(callback)
    text = out.getvalue()
    last = text.strip().split("\n\n")[-1].splitlines() if "\n\n" in text else text.splitlines()[-4:]
    assert last[0] == "sweep 'q': 1 done, 1 error"
    assert "t1" in last[1] and "lr=0.03" in last[1] and "epoch     1/3" in last[1] and "val 0.7100" in last[1] \
        and "device_s     2.5" in last[1] and last[1].endswith("DONE")
    assert "t2" in last[2] and "lr=0.1" in last[2] and "val 0.8000" in last[2] and last[2].endswith("ERROR")
    assert last[3] == "  device osc: utilisation 75%, queued rows 3, 150 rows/s"  # 300 rows in 2 s
    # the end of the sweep does not print the same block twice
    blocks = [b for b in text.split("sweep 'q':") if b]
    assert len(blocks) == len(set(blocks))


def test_a_restarted_device_counting_from_zero_keeps_its_last_rate():
    line = DeviceLine("osc")
    line.update({"rows": 1000}, now=0.0)
    line.update({"rows": 1100}, now=1.0)
    line.update({"rows": 5}, now=2.0)  # restarted actor: counts from zero, no negative rate
    assert line.rows_per_s == pytest.approx(100.0)


def test_terminal_view_is_a_rich_table_redrawn_in_place():
    out = io.StringIO()
    callback = ConsoleCallback(SweepView("sweep 'q'"), ["osc"], _describe, stream=out, live=True)
    _run_events(callback)
    text = out.getvalue()
    assert "what varies" in text and "lr=0.03" in text and "val_accuracy" in text and "rows/s" in text
    assert callback._live is None  # stopped at the end of the experiment


def test_callback_pickles_without_its_stream_or_writer():
    import pickle

    callback = ConsoleCallback(SweepView("s"), ["osc"], _describe, writer=object(), stream=io.StringIO(),
                               live=False)
    back = pickle.loads(pickle.dumps(callback))
    assert back.writer is None and back.view.title == "s" and "osc" in back.view.devices


def test_a_restart_is_told_once_with_the_retried_requests():
    view = SweepView("sweep 'q'")
    out = io.StringIO()
    callback = ConsoleCallback(view, ["osc"], _describe, stream=out, live=False, print_every_s=1e9)
    first = {"replica": 0, "rows": 10, "restarts": 0, "life": {"started": 100.0}}
    assert view.devices["osc"].update({**first, "replicas": [first]}, now=1.0) == []
    assert view.devices["osc"].update({**first, "replicas": [first]}, now=2.0) == []
    again = {"replica": 0, "rows": 12, "restarts": 1, "life": {"started": 105.0}}  # a new actor life
    notes = view.devices["osc"].update({**again, "replicas": [again]}, now=3.0)
    assert notes == ["device 'osc': its actor osc#0 restarted (1 restart so far); the trials' requests in "
                     "flight are retried, its accounting goes on from its audit log"]
    assert view.devices["osc"].update({**again, "replicas": [again]}, now=4.0) == []  # told once
    for note in notes:
        callback._tell(note)
    a = _trial("t1", 0.03)
    callback.on_trial_start(0, [a], a)
    callback.on_trial_result(1, [a], a, {"epoch": 1, "device_retries": 4})
    callback.on_experiment_end([a])
    text = out.getvalue()
    assert "its actor osc#0 restarted" in text and "4 device requests retried" in text
    assert "restarted 1x" in text


def test_an_in_silico_screen_shows_the_twins_validation_until_the_device_measures_it():
    """A screened trial's epochs report val_accuracy NaN (the device validates once, after the last):
    its line shows the twin's, marked, never "nan"; the device's figure replaces it when it comes."""
    view = SweepView("sweep 'mf'")
    out = io.StringIO()
    callback = ConsoleCallback(view, [], _describe, stream=out, live=False, print_every_s=1e9)
    a = _trial("t1", 0.03)
    callback.on_trial_start(0, [a], a)
    callback.on_trial_result(1, [a], a, {"epoch": 1, "val_accuracy": float("nan"), "val_accuracy_twin": 0.8512})
    line = view.trials["t1"].cells()
    assert line[1] == "0.8512 twin", line
    callback.on_trial_result(2, [a], a, {"epoch": 2, "val_accuracy": float("nan")})
    assert view.trials["t1"].cells()[1] == "-"
    callback.on_trial_result(3, [a], a, {"epoch": 3, "val_accuracy": 0.8, "val_accuracy_twin": 0.86})
    assert view.trials["t1"].cells()[1] == "0.8000"
    callback.on_trial_complete(4, [a], a)
    callback.on_experiment_end([a])
    assert "nan" not in out.getvalue() and "val 0.8000" in out.getvalue()


def test_device_figures_of_all_a_sweeps_tune_runs_log_on_one_clock():
    """Each Tune run of a sweep (a multifidelity sweep's two, a resume) has its own console callback:
    their device figures are logged at steps counted from the sweep's start, so a later run's figures
    come at later steps (MLflow shows the value at the highest step), not from 0 again."""
    import time

    class Writer:
        def __init__(self):
            self.steps = []

        def call(self, op, run, metrics):
            assert op == "log_batch" and run == "parent"
            self.steps += [row[3] for row in metrics if row[0] == "device.osc.utilisation"]

    writer, started = Writer(), time.time() - 120.0  # the sweep began two minutes ago
    for _run in range(2):
        view = SweepView("s")
        callback = ConsoleCallback(view, ["osc"], _describe, writer=writer, parent_run="parent",
                                   stream=io.StringIO(), live=False, started=started)
        callback._log_devices(time.monotonic())
    assert len(writer.steps) == 2 and 120 <= writer.steps[0] <= writer.steps[1] < 180, writer.steps
