"""What a pool's devices report of themselves once started (a recorded device: its replay model's
held-out error against a linear fit's, the rows it was fitted on, dead outputs and suspicious rows),
turned into the lines a person reads at the start of a sweep or training and the tags every MLflow
run of it carries (`device.<name>.<fact>`; tags, not params: a refit on another machine may differ in
the last digit, and a resumed sweep logs them again)."""
from __future__ import annotations

# The scalar facts shown and tagged, in this order (others stay in the JSON artifact).
FACTS = ("rows", "holdout_rmse", "holdout_relative_rmse", "holdout_r2", "linear_holdout_relative_rmse",
         "fit_seconds", "cached")


def fact_tags(facts: dict[str, dict], names: list[str] | None = None) -> dict[str, str]:
    """{"device.<name>.<fact>": value} for the devices named (default: all)."""
    out = {}
    for name, meta in facts.items():
        if names is not None and name not in names or not meta:
            continue
        for key in FACTS:
            if key in meta:
                value = meta[key]
                out[f"device.{name}.{key}"] = f"{value:.4g}" if isinstance(value, float) else str(value)
        dead = (meta.get("data") or {}).get("dead_outputs")
        if dead is not None:
            out[f"device.{name}.dead_outputs"] = str(dead)
    return out


def describe(facts: dict[str, dict]) -> list[str]:
    """Lines for the console: one per device that reports a fit, then its notes."""
    lines = []
    for name, meta in facts.items():
        if not meta or "holdout_rmse" not in meta:
            continue
        how = "loaded from the cache" if meta.get("cached") else f"fitted in {meta.get('fit_seconds', 0):.1f} s"
        lines.append(
            f"device '{name}': replay model of {meta['rows']:,} measured rows, held-out RMSE "
            f"{meta['holdout_rmse']:.4g} = {meta['holdout_relative_rmse']:.3f} of the responses' spread "
            f"(a linear fit: {meta['linear_holdout_relative_rmse']:.3f}), R2 {meta['holdout_r2']:.3f}; {how}")
        lines += [f"  {note}" for note in meta.get("notes") or []]
    return lines
