"""actors.tables: numeric tables as labs write them, read with their dialect detected and every row
located by the file's own numbering (oracle: the array the file was written from)."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from actors.tables import TableError, read_table

VALUES = np.round(np.random.default_rng(0).uniform(-5, 5, (40, 6)), 4)


def text(sep: str, decimal: str = ".", header: bool = True) -> str:
    rows = [sep.join(f"{v:.4f}".replace(".", decimal) for v in r) for r in VALUES]
    return "\n".join(([sep.join(f"c{i}" for i in range(6))] if header else []) + rows) + "\n"


@pytest.mark.parametrize("sep,decimal,header", [(",", ".", True), (",", ".", False), ("\t", ".", True),
                                                (";", ",", True), (";", ".", False), (" ", ",", False)])
def test_dialects_are_detected(tmp_path, sep, decimal, header):
    path = tmp_path / "t.csv"
    path.write_text(text(sep, decimal, header))
    table = read_table(path)
    np.testing.assert_allclose(table.values, VALUES)
    assert table.columns == ([f"c{i}" for i in range(6)] if header else None)
    assert table.where(0) == f"line {2 if header else 1}"


def test_gzip_npz_and_parquet_hold_the_same_table(tmp_path):
    gz = tmp_path / "t.csv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(text(","))
    np.testing.assert_allclose(read_table(gz).values, VALUES)
    npz = tmp_path / "t.npz"
    np.savez(npz, table=VALUES)
    assert read_table(npz).where(3) == "row 4"
    pd = pytest.importorskip("pandas")  # mlflow brings pandas and pyarrow: present wherever physfarm is
    pq = tmp_path / "t.parquet"
    pd.DataFrame(VALUES, columns=[f"c{i}" for i in range(6)]).to_parquet(pq)
    table = read_table(pq)
    np.testing.assert_allclose(table.values, VALUES)
    assert table.columns == [f"c{i}" for i in range(6)]


def test_a_forced_dialect_that_does_not_fit_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text(text(";", ","))
    with pytest.raises(TableError, match=r"cannot read its lines as columns of numbers .* set `delimiter` and "
                                         r"`decimal` to the file's"):
        read_table(path, delimiter="comma")
    np.testing.assert_allclose(read_table(path, delimiter="semicolon", decimal="comma").values, VALUES)


def test_not_a_table(tmp_path):
    path = tmp_path / "words.csv"
    path.write_text("alpha beta\ngamma delta\n")
    with pytest.raises(TableError, match="cannot read its lines as columns of numbers"):
        read_table(path)
    with pytest.raises(TableError, match="does not exist"):
        read_table(tmp_path / "absent.csv")
