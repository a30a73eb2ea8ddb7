"""`recorded`: fit a device from measured rows, report the held-out error, replay with residual noise,
and refuse bad files with the file and row named."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.errors import EnvelopeError
from actors.systems.recorded import Recorded
from actors.systems.recorded_data import read_measurements
from actors.systems.registry import build_system

LAYOUT = {"n_inputs": 3, "n_params": 1, "n_outputs": 10}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def truth(u: np.ndarray) -> np.ndarray:
    """A smooth 4 -> 10 'device' whose measurements carry Gaussian noise of std 0.02."""
    k = np.arange(1, 11)
    return np.sin(u @ np.array([1.0, -0.5, 0.3, 0.8])[:, None] * k / 3 + k) + 0.5 * u[:, :1] ** 2


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    rng = np.random.default_rng(0)
    u = rng.uniform(-1, 1, size=(800, 4))
    y = truth(u) + 0.02 * rng.standard_normal((800, 10))
    root = tmp_path_factory.mktemp("rec")
    csv_path = root / "rows.csv"
    header = ",".join([f"x{i}" for i in range(3)] + ["theta0"] + [f"y{i}" for i in range(10)])
    np.savetxt(csv_path, np.hstack([u, y]), delimiter=",", header=header, comments="")
    npz_path = root / "rows.npz"
    np.savez(npz_path, x=u[:, :3], theta=u[:, 3:], y=y)
    return {"csv": csv_path, "npz": npz_path, "u": u}


def config(path, **kw):
    return {"kind": "recorded", "path": None if path is None else str(path), **LAYOUT, "input_range": (-1, 1),
            "param_range": (-1, 1), "steps": 3000, "hidden": (64, 64), **kw}


def test_fit_reports_held_out_error_and_replays_with_residual_noise(measured):
    d = build_system(config(measured["csv"]))
    assert d.info["fitted"] is False  # nothing read yet
    d.connect()
    info = d.metadata()
    assert info["rows"] == 800 and info["holdout_rows"] == 160 and info["train_rows"] == 640
    assert 0.0 < info["holdout_rmse"] < 0.1 and info["holdout_r2"] > 0.97
    assert len(info["holdout_rmse_per_output"]) == 10
    noise = np.array(info["noise_std_per_output"])
    assert (noise > 0.015).all() and (noise < 0.1).all()  # at least the measurement noise (0.02)
    # Served outputs: the model plus noise with that spread.
    x = torch.zeros(2000, 3)
    theta = torch.zeros(1)
    y = d.forward(x, theta)
    clean = d.ideal_model()(x, theta).detach()
    assert torch.allclose(y.std(0), torch.tensor(noise, dtype=torch.float32), rtol=0.15)
    assert torch.allclose(y.mean(0), clean[0], atol=0.01)
    assert float((clean[0] - torch.tensor(truth(np.zeros((1, 4)))[0], dtype=torch.float32)).abs().max()) < 0.15


def test_csv_and_npz_give_the_same_fit(measured):
    a = build_system(config(measured["csv"], noise=0))
    b = build_system(config(measured["npz"], noise=0))
    x = torch.rand(5, 3) * 2 - 1
    theta = torch.tensor([0.3])
    assert torch.allclose(a.forward(x, theta), b.forward(x, theta), atol=1e-4)
    assert a.info["holdout_rmse"] == pytest.approx(b.info["holdout_rmse"], rel=1e-3)


def test_ideal_model_is_the_fit_and_is_trainable(measured):
    d = build_system(config(measured["npz"], noise=0))
    model = d.ideal_model()
    x = (torch.rand(4, 3) * 2 - 1).requires_grad_(True)
    theta = torch.tensor([0.1], requires_grad=True)
    out = model(x, theta)
    assert torch.equal(out.detach(), d.forward(x.detach(), theta.detach()))
    gx, gt = torch.autograd.grad(out.sum(), [x, theta])
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0 and torch.isfinite(gt).all()
    assert all(p.requires_grad for p in model.parameters())  # a copy a twin trainer may fine-tune
    with pytest.raises(EnvelopeError, match="input range"):
        d.forward(torch.full((1, 3), 2.0), theta.detach())


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def good_rows(n=30, cols=14):
    rng = np.random.default_rng(1)
    return "\n".join(",".join(f"{v:.4f}" for v in rng.uniform(-1, 1, cols)) for _ in range(n))


@pytest.mark.parametrize("case,pattern", [
    ("columns", r"bad\.csv: line 5 has 13 columns, the others 14"),
    ("nan", r"bad\.csv: line 8, column 3 \(controls\) is nan; every value must be a finite number"),
    ("text", r"bad\.csv: line 4, column 6 is 'oops', not a number"),
    ("few", r"bad\.csv: 6 rows of data, need at least 20"),
    ("envelope", r"line 3 of bad\.csv: control column 1 \(x\) is 1\.5, outside the declared x range"),
    ("header", r"bad\.csv: the header \(line 1\) has 3 names but the data lines have 14 columns"),
    ("width", r"bad\.csv: 13 columns \(comma-separated, decimal point, no header\), expected 14"),
])
def test_bad_csv_files_name_the_file_and_line(tmp_path, case, pattern):
    rows = good_rows().split("\n")
    if case == "columns":
        rows[4] = ",".join(rows[4].split(",")[:-1])
    elif case == "nan":
        cells = rows[7].split(",")
        cells[2] = "nan"
        rows[7] = ",".join(cells)
    elif case == "text":
        cells = rows[3].split(",")
        cells[5] = "oops"
        rows[3] = ",".join(cells)
    elif case == "few":
        rows = rows[:6]
    elif case == "envelope":
        cells = rows[2].split(",")
        cells[0] = "1.5"
        rows[2] = ",".join(cells)
    elif case == "header":
        rows = ["a,b,c"] + rows
    elif case == "width":
        rows = [",".join(r.split(",")[:-1]) for r in rows]
    path = write(tmp_path, "bad.csv", "\n".join(rows) + "\n")
    d = build_system(config(path))  # constructing reads nothing
    with pytest.raises(ValueError, match=pattern):
        d.connect()


def test_bad_npz_and_missing_files(tmp_path):
    p = tmp_path / "wrong.npz"
    np.savez(p, a=np.zeros((30, 4)))
    with pytest.raises(ValueError, match=r"wrong\.npz: an NPZ needs arrays 'controls' and 'responses'"):
        build_system(config(p)).connect()
    p2 = tmp_path / "shape.npz"
    np.savez(p2, controls=np.zeros((30, 5)), responses=np.zeros((30, 10)))
    with pytest.raises(ValueError, match=r"shape\.npz: the controls have 5 columns .*expected n_inputs \+ n_params = 4"):
        build_system(config(p2)).connect()
    p3 = tmp_path / "inf.npz"
    c = np.zeros((30, 4))
    r = np.zeros((30, 10))
    r[17, 9] = np.inf
    np.savez(p3, controls=c, responses=r)
    with pytest.raises(ValueError, match=r"inf\.npz: row 18, column 10 \(responses\) is inf"):
        build_system(config(p3)).connect()
    with pytest.raises(ValueError, match=r"absent\.csv' does not exist"):
        build_system(config(tmp_path / "absent.csv")).forward(torch.zeros(1, 3), torch.zeros(1))


def lab_rows(n=400, seed=2):
    """Controls u [n, 4] in [-1, 1] and responses [n, 10]: outputs 2 and 7 dead (a constant plus 1e-5
    jitter), the first row a placeholder of zeros, rows 10 and 11 repeating rows 3 and 4."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 1, size=(n, 4))
    y = truth(u) + 0.02 * rng.standard_normal((n, 10))
    y[:, [2, 7]] = 0.4 + 1e-5 * rng.standard_normal((n, 2))
    u[0], y[0] = 0.0, 0.0
    u[10:12], y[10:12] = u[3:5], y[3:5]
    return u, y


def fmt(values: np.ndarray, sep: str, decimal: str = ".") -> list[str]:
    return [sep.join(f"{v:.6f}".replace(".", decimal) for v in row) for row in values]


@pytest.mark.parametrize("sep,decimal,header", [(",", ".", True), ("\t", ".", False), (";", ",", True),
                                                (" ", ".", False)])
def test_dialects_and_two_files_read_the_same_rows(tmp_path, sep, decimal, header):
    u, y = lab_rows()
    head_u = [sep.join(f"u{i}" for i in range(4))] if header else []
    head_y = [sep.join(f"y{i}" for i in range(10))] if header else []
    xs = write(tmp_path, "x.csv", "\n".join(head_u + fmt(u, sep, decimal)) + "\n")
    ys = write(tmp_path, "y.csv", "\n".join(head_y + fmt(y, sep, decimal)) + "\n")
    cfg = config(None, controls_path=str(xs), responses_path=str(ys))
    del cfg["path"]
    m = read_measurements(Recorded(cfg).config)
    np.testing.assert_allclose(m.u, u, atol=1e-6)
    np.testing.assert_allclose(m.y, y, atol=1e-6)
    first = 2 if header else 1
    assert m.where(0) == f"line {first} of x.csv and line {first} of y.csv"


def test_suspicious_rows_and_dead_outputs_are_reported_and_dropped_on_request(tmp_path):
    u, y = lab_rows()
    path = tmp_path / "lab.csv"
    np.savetxt(path, np.hstack([u, y]), delimiter=",", fmt="%.8f")
    d = build_system(config(path))
    seen = d.inspect()  # reads and checks, fits nothing
    assert d.info["fitted"] is False
    assert seen["summary"]["zero_rows"] == 1 and seen["summary"]["duplicate_rows"] == 2
    assert seen["summary"]["dead_outputs"] == [2, 7]
    notes = " | ".join(seen["notes"])
    assert "1 row(s) of all zeros (a placeholder?): line 1 of lab.csv; kept; add zero_rows to `drop`" in notes
    assert "2 row(s) repeat an earlier row exactly: line 11 of lab.csv, line 12 of lab.csv" in notes
    assert "outputs [2, 7] (0-based)" in notes
    kept = build_system(config(path, drop=["zero_rows", "duplicate_rows"]))
    info = kept.metadata()
    assert info["rows"] == 397 and info["data"]["dropped_rows"] == {"zero_rows": 1, "duplicate_rows": 2}
    assert kept.dead_outputs() == [2, 7]


def test_fit_error_is_read_against_a_linear_fit_and_cached_for_other_processes(measured, tmp_path):
    import subprocess
    import sys

    cfg = config(measured["csv"], cache_dir=str(tmp_path / "cache"), seed=11)  # a fit no other test made
    d = build_system(cfg)
    info = d.metadata()
    assert info["cached"] is False and info["fit_seconds"] > 0
    # the MLP explains what a straight line cannot: its relative error is a fraction of the linear one's
    assert info["holdout_relative_rmse"] < 0.5 * info["linear_holdout_relative_rmse"]
    assert list((tmp_path / "cache" / "recorded").glob("*.pt"))
    probe = ("import json, sys; from actors.systems.registry import build_system; "
             "d = build_system(json.loads(sys.argv[1])); i = d.metadata(); "
             "print(json.dumps([i['cached'], i['holdout_rmse']]))")
    out = subprocess.run([sys.executable, "-c", probe, json.dumps(cfg)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    cached, rmse = json.loads(out.stdout.strip().splitlines()[-1])
    assert cached is True and rmse == info["holdout_rmse"]  # another process: loaded, not refitted
    other = build_system({**cfg, "hidden": (32,)}).metadata()  # other settings: another fit
    assert other["cached"] is False


def test_config_refuses_knobs_it_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match="has no drift"):
        Recorded(config(tmp_path / "x.csv", drift=1.0))
    with pytest.raises(ValueError, match="input_range"):
        Recorded(config(tmp_path / "x.csv", input_range=(1, 0)))
