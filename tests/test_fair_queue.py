"""The fair queue on its own (no Ray, no threads, no clock): round-robin batches, least recently
served first, row limits, given-up items and items a lease does not admit."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.fair_queue import FairQueue


@dataclass(eq=False)
class Item:
    client: str
    rows: int
    tag: str = ""
    dead: bool = False
    token: str | None = None


def _queue() -> FairQueue[Item]:
    return FairQueue(is_dead=lambda item: item.dead)


def _push(q: FairQueue, client: str, *sizes: int) -> list[Item]:
    items = [Item(client, n, f"{client}{i}") for i, n in enumerate(sizes)]
    q.push(client, items)
    return items


def _tags(batch) -> list[str]:
    return [item.tag for item in batch]


def test_one_request_per_client_per_round_until_the_row_limit():
    q = _queue()
    _push(q, "a", 4, 4, 4)
    _push(q, "b", 4, 4)
    assert q and q.rows == 20 and len(q) == 5 and q.clients() == ["a", "b"]
    assert _tags(q.take(8)) == ["a0", "b0"]  # one each, not a's whole queue
    assert _tags(q.take(12)) == ["a1", "b1", "a2"]  # both served last turn: arrival order breaks the tie
    assert not q and q.rows == 0 and len(q) == 0 and q.clients() == []


def test_a_heavy_client_cannot_starve_a_light_one():
    q = _queue()
    _push(q, "heavy", *[8] * 10)
    assert _tags(q.take(8)) == ["heavy0"]
    _push(q, "light", 2)  # arrives behind nine full-size requests
    assert _tags(q.take(8)) == ["light0"]  # never served: goes first; heavy's next would not fit
    assert _tags(q.take(8)) == ["heavy1"]


def test_least_recently_served_goes_first():
    q = _queue()
    _push(q, "a", 1, 1)
    _push(q, "b", 1, 1)
    assert _tags(q.take(1)) == ["a0"]
    assert _tags(q.take(1)) == ["b0"]  # a was served more recently
    _push(q, "c", 1)
    assert _tags(q.take(1)) == ["c0"]  # never served beats both
    assert _tags(q.take(1)) == ["a1"]


def test_a_request_larger_than_the_limit_still_goes_alone():
    q = _queue()
    _push(q, "a", 20)
    _push(q, "b", 1)
    assert _tags(q.take(8)) == ["a0"]  # the first item of a batch is taken whatever its size
    assert _tags(q.take(8)) == ["b0"]


def test_smaller_requests_fill_the_room_a_bigger_one_leaves():
    q = _queue()
    _push(q, "a", 6)
    _push(q, "b", 6)
    _push(q, "c", 2)
    assert _tags(q.take(8)) == ["a0", "c0"]  # b's 6 rows would not fit; c's 2 do
    assert _tags(q.take(8)) == ["b0"]


def test_given_up_items_are_dropped_unserved_and_uncounted():
    q = _queue()
    a = _push(q, "a", 3, 3)
    _push(q, "b", 2)
    a[0].dead = True
    assert q.ready()
    assert _tags(q.take(10)) == ["a1", "b0"]
    assert q.rows == 0 and len(q) == 0
    (lone,) = _push(q, "c", 5)
    lone.dead = True
    assert not q.ready() and q.take(10) == [] and q.rows == 0 and q.clients() == []


def test_items_not_admitted_wait_and_keep_their_order():
    q = _queue()
    _push(q, "holder", 2, 2)
    _push(q, "other", 2)
    holder_only = lambda item: item.client == "holder"  # noqa: E731 - a lease admitting its holder
    assert _tags(q.take(10, holder_only)) == ["holder0", "holder1"]
    assert not q.ready(holder_only) and q.ready() and q.rows == 2
    assert _tags(q.take(10)) == ["other0"]  # the lease ended


def test_remove_unless_hands_back_the_refused_and_keeps_the_rest_in_order():
    q = _queue()
    _push(q, "holder", 1, 2)
    other = _push(q, "other", 3, 4)
    _push(q, "gone", 5)[0].dead = True
    removed = q.remove_unless(lambda item: item.client == "holder")
    assert removed == other  # the refused ones, to be answered; the dead one silently dropped
    assert q.rows == 3 and q.clients() == ["holder"]
    assert _tags(q.take(10)) == ["holder0", "holder1"]


def test_forgets_served_clients_with_nothing_queued_past_forget_after():
    def replay(q: FairQueue) -> str:
        for c in ("c0", "c1", "c2"):
            q.push(c, [Item(c, 1)])
            q.take(1)
        q.push("c2", [Item("c2", 1)])
        q.push("new", [Item("new", 1)])
        return q.take(1)[0].client

    assert replay(FairQueue()) == "new"  # c2 was served last: the newcomer goes first
    # Three clients remembered > 2: those with nothing queued are forgotten, and a forgotten client
    # counts as never served (a tie with the newcomer, broken by arrival order).
    assert replay(FairQueue(forget_after=2)) == "c2"


@settings(max_examples=200, deadline=None)
@given(plans=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=1, max_size=6),
       limit=st.integers(1, 12))
def test_every_item_is_served_once_in_order_per_client_within_the_limit(plans, limit):
    q = _queue()
    sent = {f"c{c}": _push(q, f"c{c}", *sizes) for c, sizes in enumerate(plans)}
    served: dict[str, list[Item]] = {c: [] for c in sent}
    waiting_turns = {c: 0 for c in sent}
    while q.ready():
        batch = q.take(limit)
        assert batch and (len(batch) == 1 or sum(i.rows for i in batch) <= limit)
        clients = [i.client for i in batch]
        firsts = list(dict.fromkeys(clients))  # one round: one item per client, then the next round
        assert clients[: len(firsts)] == firsts
        for c in sent:  # fairness: a client with work waits at most one batch per other client
            if c in clients or not (len(served[c]) < len(sent[c])):
                waiting_turns[c] = 0
            else:
                waiting_turns[c] += 1
                assert waiting_turns[c] <= len(sent) - 1, (c, waiting_turns)
        for item in batch:
            served[item.client].append(item)
    assert served == sent and q.rows == 0 and len(q) == 0
