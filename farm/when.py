"""Times people type on the command line, as wall-clock seconds since the epoch (local time zone).

  2026-12-03 14:00   2026-12-03T14:00:30   14:00 (today)   now
  +2h, +30m, +1d, +90s   from now (reservations' --from/--to)
  2h, 30m, 1d, 90s       ago (an audit's --since)
"""
from __future__ import annotations

import re
import time
from datetime import datetime

_SPAN = re.compile(r"^(?P<sign>[+-]?)(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
FORMS = "'2026-12-03 14:00', '14:00' (today), 'now', '+2h' (from now) or '2h' (ago); units s, m, h, d, w"


def parse_when(text: str, now: float | None = None, bare_span: str = "ago", what: str = "time") -> float:
    """Wall seconds for `text`. A span without a sign counts back from now when `bare_span` is "ago",
    forward when "ahead". ValueError naming `what`, the text and the accepted forms otherwise."""
    now = time.time() if now is None else now
    t = text.strip()
    if t == "now":
        return now
    m = _SPAN.match(t)
    if m:
        span = float(m["n"]) * _UNIT_S[m["unit"]]
        sign = m["sign"] or ("-" if bare_span == "ago" else "+")
        return now - span if sign == "-" else now + span
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(t, fmt).timestamp()
        except ValueError:
            pass
    for fmt in ("%H:%M", "%H:%M:%S"):
        try:
            clock = datetime.strptime(t, fmt).time()
        except ValueError:
            continue
        return datetime.combine(datetime.fromtimestamp(now).date(), clock).timestamp()
    raise ValueError(f"{what} {text!r} is not a time physfarm reads; give {FORMS}")


def format_wall(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
