"""Shared fixtures: a real Ray per test module, a real MLflow SQLite store per test."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VOWELS_CSV = SHARED_DATA / "vowels_hillenbrand_women.csv"


@pytest.fixture(scope="module")
def ray_session():
    """A real local Ray for the whole module (2 CPUs, no dashboard), shut down afterwards."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="physfarm", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def vowels_csv() -> Path:
    if not VOWELS_CSV.exists():
        pytest.skip(f"vowel data not found at {VOWELS_CSV} (it lives in ../shared/data beside the checkout)")
    return VOWELS_CSV
