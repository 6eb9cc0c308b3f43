"""One budget per key across Envoys: the decisions (decide/budgets.py), where requests arrive
(observe/admissions.py, from access-log entries) and the keeper that publishes them (plane/budgets.py),
in process. tests/test_quotas.py holds real Envoys to the budget."""

from __future__ import annotations

import asyncio

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from control_plane.config import PlanConfig
from control_plane.decide.budgets import (DEBT_SLACK, MOST_HELD_BACK, MOST_OWED_MINUTES, REPAY_S, Ledger, charge, charges,
                                         moved, water_level)
from control_plane.names import (AUDIO_SECONDS_HEADER, AUDIO_SECONDS_LIMIT, AUDIO_SECONDS_PER_DAY_LIMIT, BUDGET_SCALE,
                                 ENGINE_SECONDS_KEY, KEY_ID_HEADER, KEY_ID_KEY, LIMITED_HEADER, METADATA_NAMESPACE, MODEL_KEY,
                                 REQUESTS_LIMIT, SECONDS_KEY, STREAMED_KEY)
from control_plane.observe.access_logs import (REQUEST_ENDED, TRY_ENDED, TRY_STARTED, AccessLogServicer, Known, arrival,
                                              charged_after)
from control_plane.fleet.usage_store import MemoryUsageStore
from control_plane.observe.admissions import DEMAND_WINDOW_S, MOST_ENVOYS, SEEN_MARGIN_S, SEEN_MOST, Admissions
from control_plane.observe.in_flight import InFlight
from control_plane.observe.ledger import Ledger as Metering
from control_plane.observe.outcomes import Outcomes
from control_plane.observe.usage import USAGE_FLUSH_S, utc_day
from control_plane.plane.usage import UsageKeeper
from control_plane.plane.budgets import BudgetKeeper
from control_plane.tenants.keys import Budget, KeyTable


@pytest.mark.parametrize("demands,budget,level", [
    ([], 60, 60),  # no demand: the whole budget anywhere
    ([100], 60, 60),  # all through one Envoy
    ([100, 100], 60, 30),  # spread evenly over two
    ([100] * 8, 60, 7.5),  # over eight
    ([100, 10], 60, 50),  # one wants less than its even share: the rest to the other
    ([20, 20], 60, 40),  # wanting less than the budget: the largest plus what is left over
    ([0, 100, 0], 60, 60),  # Envoys with nothing count for nothing
    ([30, 30], 60, 30),  # exactly the budget
])
def test_the_water_level_shares_a_budget_by_demand(demands, budget, level):
    assert water_level(demands, budget) == pytest.approx(level)
    if sum(demands) >= budget:
        assert sum(min(d, level) for d in demands) == pytest.approx(budget)


@pytest.mark.parametrize("demands,shared,envoys,times", [
    ([100] * 2, 60, 2, 2),
    ([100] * 8, 60, 8, 8),
    ([100], 60, 8, 1),  # all on one of eight: charged once
    ([100, 10], 60, 2, 1.2),
    ([100] * 8, 60, 2, 2),  # never more than the Envoys' count (while nothing is owed)
    ([100] * 2, 30, 2, 4),  # half the budget held back to repay debt: twice the charge
])
def test_the_charge_is_the_budget_over_the_water_level(demands, shared, envoys, times):
    assert charge(demands, shared, 60, envoys) == pytest.approx(times * BUDGET_SCALE, abs=1)


def test_a_charge_moves_only_past_its_step():
    assert moved(500, None) and moved(511, 500) and moved(489, 500)
    assert not moved(510, 500) and not moved(490, 500)


def test_the_ledger_refills_a_minutes_budget_a_minute_and_repays_debt_by_sharing_out_less():
    ledger = Ledger.full(60, now=0.0)
    ledger.take(60, 0.0)
    assert ledger.debt(0.0) == 0 and ledger.shared_out(0.0) == 60
    ledger.take(15, 0.0)  # 15 admitted beyond it
    assert ledger.debt(0.0) == 15
    slack = 1 + DEBT_SLACK * 60
    assert ledger.shared_out(0.0) == pytest.approx(60 - (15 - slack) * 60 / REPAY_S)
    assert ledger.debt(15.0) == 0  # a minute's budget comes back in a minute: 15 in 15 s
    ledger.take(1000, 16.0)
    assert ledger.shared_out(16.0) == pytest.approx(6)  # at most 90% held back
    assert Ledger.full(60, 0.0).debt(3600.0) == 0 and Ledger.full(60, 0.0).tokens == 60


def test_charges_per_limit_follow_each_limits_own_demand():
    ledgers = {REQUESTS_LIMIT: Ledger(600, 0.0, 0.0), AUDIO_SECONDS_LIMIT: Ledger(60, 0.0, 0.0)}  # just spent
    # Two Envoys: the requests' budget barely touched (its level: 10 + the 580 left, so a charge of
    # 600 / 590), the audio wanted twice over at each (charged twice).
    decided = charges({"a": (10, 120), "b": (10, 120)}, ledgers, {REQUESTS_LIMIT: 600, AUDIO_SECONDS_LIMIT: 60}, 2, 0.0)
    assert decided == {REQUESTS_LIMIT: 255, AUDIO_SECONDS_LIMIT: 2 * BUDGET_SCALE}


def entry(kind, request_id="r1", key="key-1", seconds="7.5", limited=None) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.access_log_type = kind
    e.request.request_id = request_id
    if kind != REQUEST_ENDED:
        e.request.request_headers[KEY_ID_HEADER] = key
        e.request.request_headers[AUDIO_SECONDS_HEADER] = seconds
    else:
        fields = e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields
        fields[KEY_ID_KEY].string_value = key
        fields[SECONDS_KEY].string_value = seconds
        e.response.response_code.value = 429
        if limited:
            e.response.response_headers[LIMITED_HEADER] = limited
    return e


def test_arrivals_are_a_tries_start_and_a_per_minute_limits_refusal():
    assert arrival(entry(TRY_STARTED)) == ("key-1", 8, True)  # its cost in whole audio-seconds
    assert arrival(entry(TRY_STARTED, seconds="0.2")) == ("key-1", 1, True)
    assert arrival(entry(REQUEST_ENDED, limited=AUDIO_SECONDS_LIMIT)) == ("key-1", 8, False)
    assert arrival(entry(REQUEST_ENDED, limited=REQUESTS_LIMIT)) == ("key-1", 8, False)
    assert arrival(entry(REQUEST_ENDED, limited="requests_in_flight")) is None  # not a rate
    assert arrival(entry(REQUEST_ENDED)) is None  # an engine's 429
    assert arrival(entry(TRY_ENDED)) is None
    assert arrival(entry(TRY_STARTED, key="")) is None  # no key: no budget
    assert arrival(entry(TRY_STARTED, seconds="nan")) is None


def requests_billed(seen: Admissions) -> int:
    return sum(billed.requests for billed in seen.take_unbilled())


def test_admissions_count_a_request_once_and_demand_per_envoy_per_minute():
    seen = Admissions()
    for i in range(10):
        seen.arrived(f"r{i}", "k", "envoy-1", 2, True, 10.0 + i)
        seen.arrived(f"r{i}", "k", "envoy-1", 2, True, 10.5 + i)  # a retry or a hedge: the same request
    for i in range(5):
        seen.arrived(f"s{i}", "k", "envoy-2", 3, False, 12.0 + i)  # refused: demand, not billed
    assert requests_billed(seen) == 10 and seen.take_unbilled() == []
    demand = seen.demand(20.0, since=0.0)["k"]
    per_minute = 60 / DEMAND_WINDOW_S
    assert demand["envoy-1"] == pytest.approx((10 * per_minute, 20 * per_minute))
    assert demand["envoy-2"] == pytest.approx((5 * per_minute, 15 * per_minute))
    # Just started: the window is what has been seen.
    assert seen.demand(20.0, since=15.0)["k"]["envoy-1"][0] == pytest.approx(10 * 60 / 5)
    assert seen.demand(20.0 + DEMAND_WINDOW_S + 10, since=0.0) == {}  # gone past the window


class Clock:
    def __init__(self):
        self.now, self.wall = 1000.0, 1_800_000_000.0


def keeper_for(plans, envoys=2):
    """A keeper over a real metering ledger and usage keeper, whose store the other planes write to."""
    clock, published, seen, ledger = Clock(), [], Admissions(), Metering()
    usage = UsageKeeper(ledger.usage, MemoryUsageStore(), "this-plane", lambda: 30, lambda: True)

    async def publish(budgets):
        published.append(budgets)

    keeper = BudgetKeeper(seen, lambda: plans, lambda: envoys, usage.own_rows, usage.other_rows, publish,
                          lambda: clock.now, lambda: clock.wall)
    keeper.metering, keeper.usage = ledger, usage  # what the tests meter and write through
    return keeper, seen, clock, published


PLAN = PlanConfig(requests_per_minute=600, audio_seconds_per_minute=60, audio_seconds_per_day=1000)


def test_the_keeper_publishes_each_keys_charge_from_where_its_requests_arrive():
    keeper, seen, clock, published = keeper_for({"k": PLAN, "idle": PLAN}, envoys=2)
    clock.now += DEMAND_WINDOW_S
    for i in range(20):  # 2 s clips at two Envoys, 120 audio-seconds a minute wanted at each
        seen.arrived(f"a{i}", "k", "envoy-1", 2, i < 10, clock.now - i)
        seen.arrived(f"b{i}", "k", "envoy-2", 2, i < 10, clock.now - i)
    asyncio.run(keeper.round())
    # 60 requests a minute at each of 600: level 60 + 480; the audio spread evenly: twice.
    assert published[-1] == {"k": Budget(requests_charge=278, audio_charge=2 * BUDGET_SCALE)}
    clock.now += 1
    asyncio.run(keeper.round())
    assert len(published) == 1  # nothing moved: nothing published


def test_the_keeper_refuses_a_key_whose_day_is_spent_until_midnight_utc():
    keeper, _, clock, published = keeper_for({"k": PLAN, "other": PLAN})
    day, midnight = utc_day(clock.wall)
    day = day.isoformat()
    asyncio.run(keeper.usage.store.put(day, "plane-b", {
        "k": {"m1": {"audio_received_s": 900.0, "audio_refused_s": 50.0}, "m2": {"audio_received_s": 150.0}},
        "other": {"m1": {"audio_received_s": 999.0}}}))
    asyncio.run(keeper.round(check_days=True))
    assert published[-1] == {"k": Budget(refused=AUDIO_SECONDS_PER_DAY_LIMIT, refused_until=midnight)}
    assert 0 < midnight - clock.wall <= 86400 and midnight % 86400 == 0
    clock.wall = midnight + 1  # the next day: its usage starts again (those records are the day before's)
    clock.now += 10
    asyncio.run(keeper.round())
    assert published[-1] == {}


def test_a_day_spent_on_this_plane_is_refused_next_round_and_on_other_planes_within_a_flush():
    keeper, _, clock, published = keeper_for({"here": PLAN, "there": PLAN, "flushed": PLAN})
    day, midnight = utc_day(clock.wall)
    day = day.isoformat()
    refused = Budget(refused=AUDIO_SECONDS_PER_DAY_LIMIT, refused_until=midnight)
    asyncio.run(keeper.round(check_days=True))
    keeper.metering.meter("m1", 600.0, False, "served", "flushed", day)
    asyncio.run(keeper.usage.flush())  # this plane's own record, written: counted once, not twice
    asyncio.run(keeper.usage.store.put(day, "plane-b", {"there": {"m1": {"audio_received_s": 1000.0}}}))
    keeper.metering.meter("m1", 1000.0, False, "served", "here", day)
    clock.now += 1
    asyncio.run(keeper.round())
    assert published[-1] == {"here": refused}  # this plane's own metering: at once
    clock.now += USAGE_FLUSH_S - 1
    asyncio.run(keeper.round())
    assert published[-1] == {"here": refused, "there": refused}  # another plane's: once its records are read


def test_debt_from_admissions_beyond_the_budget_raises_the_charge_until_repaid():
    keeper, seen, clock, published = keeper_for({"k": PLAN}, envoys=1)
    clock.now += DEMAND_WINDOW_S
    for i in range(60):  # 120 audio-seconds admitted at once, against 60 a minute (a refilled bucket)
        seen.arrived(f"r{i}", "k", "envoy-1", 2, True, clock.now)
    asyncio.run(keeper.round())
    assert published[-1]["k"].audio_charge == pytest.approx(BUDGET_SCALE * 60 / 6, abs=1)  # 90% held back
    clock.now += 60 + REPAY_S
    for i in range(5):
        seen.arrived(f"s{i}", "k", "envoy-1", 2, True, clock.now)
    asyncio.run(keeper.round())
    assert published[-1]["k"].audio_charge == BUDGET_SCALE  # repaid: once again


def served_with_engine_figure(edge: str, engine: str | None) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.access_log_type = REQUEST_ENDED
    e.response.response_code.value = 200
    fields = e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields
    fields[KEY_ID_KEY].string_value = "key-1"
    fields[SECONDS_KEY].string_value = edge
    if engine is not None:
        fields[ENGINE_SECONDS_KEY].string_value = engine
    return e


def test_what_the_engines_figure_adds_is_charged_to_the_keys_budget_after_the_fact():
    assert charged_after(served_with_engine_figure("0.95", "61.0")) == ("key-1", 60)  # charged 1, was 61
    assert charged_after(served_with_engine_figure("60.4", "61.0")) is None  # the same whole seconds
    assert charged_after(served_with_engine_figure("61.0", "30.0")) is None  # less: never refunded early
    assert charged_after(served_with_engine_figure("1.0", None)) is None
    # A recording streamed to its worker unread was charged one audio-second at its headers.
    streamed = served_with_engine_figure("200.2", None)
    streamed.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields[STREAMED_KEY].string_value = "1"
    assert charged_after(streamed) is None  # its answer named no model this gateway serves
    streamed.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields[MODEL_KEY].string_value = "m"
    assert charged_after(streamed) == ("key-1", 200)
    keeper, seen, clock, published = keeper_for({"k": PLAN}, envoys=1)
    seen.arrived("r1", "k", "envoy-1", 1, True, clock.now)
    seen.charged_after("k", 60, clock.now)
    asyncio.run(keeper.round())
    assert keeper.ledgers["k"][AUDIO_SECONDS_LIMIT].debt(clock.now) == pytest.approx(1)
    assert keeper.ledgers["k"][REQUESTS_LIMIT].tokens == pytest.approx(599)  # one request, not two
    assert seen.demand(clock.now, 0.0)["k"] == {"envoy-1": pytest.approx((60 / DEMAND_WINDOW_S, 60 / DEMAND_WINDOW_S))}


def test_the_keys_with_budgets_are_those_envoy_grants_a_plan():
    table, ids = KeyTable(), iter(f"key-{i}" for i in range(10))
    make = {"make_id": lambda: next(ids)}
    own, default, dropped, unplanned, revoked = (
        table.create("own", (), "interactive", 0.0, 10, plan="gold", **make)[0],
        table.create("default", (), "interactive", 0.0, 10, **make)[0],
        table.create("dropped", (), "interactive", 0.0, 10, plan="silver", **make)[0],
        table.create("unplanned", (), "interactive", 0.0, 10, **make)[0],
        table.create("revoked", (), "interactive", 0.0, 10, plan="gold", **make)[0])
    table.revoke(revoked.id, 1.0)
    expected = {own.id: "gold", default.id: "basic", dropped.id: "basic", unplanned.id: "basic"}
    assert table.plans({"gold", "basic"}, "basic") == expected  # a plan the config dropped: the default
    assert table.plans({"gold"}, None) == {own.id: "gold"}
    assert {grant.id: grant.plan for grant in table.grants({"gold", "basic"}, "basic").values()} == expected


def test_only_keys_with_traffic_have_ledgers_and_an_idle_keys_goes_once_refilled():
    plans = {f"key-{i}": PLAN for i in range(1000)}
    keeper, seen, clock, published = keeper_for(plans, envoys=1)
    for i in range(40):  # 80 audio-seconds, against 60 a minute: 20 owed
        seen.arrived(f"r{i}", "key-7", "envoy-1", 2, True, clock.now)
    asyncio.run(keeper.round())
    assert set(keeper.ledgers) == {"key-7"} and set(published[-1]) == {"key-7"}
    clock.now += DEMAND_WINDOW_S + 1  # no demand left, still owing
    asyncio.run(keeper.round())
    assert set(keeper.ledgers) == {"key-7"}
    clock.now += 60  # repaid and refilled: the same as a new key's ledger
    asyncio.run(keeper.round())
    assert keeper.ledgers == {} and published[-1] == {}


def test_a_request_id_is_remembered_per_envoy_as_long_as_a_request_lasts_within_a_bound():
    seen = Admissions(route_s=lambda: 900.0)
    seen.arrived("r1", "k", "envoy-1", 2, True, 0.0)
    seen.arrived("r1", "k", "envoy-2", 2, True, 500.0)  # another Envoy's id: its own request
    seen.arrived("r1", "k", "envoy-1", 2, True, 900.0)  # a retry at the route timeout's end: the same request
    assert requests_billed(seen) == 2
    seen.arrived("r1", "k", "envoy-1", 2, True, 900.0 + SEEN_MARGIN_S + 1)  # no request lasts so long: a new one
    assert requests_billed(seen) == 1
    for i in range(SEEN_MOST + 10):  # one Envoy reporting more ids than are kept: its own oldest go
        seen.arrived(f"x{i}", "k", "envoy-3", 1, True, 1000.0)
    assert seen.seen() == SEEN_MOST
    seen.arrived("r1", "k", "envoy-2", 2, True, 1000.0)  # the other Envoys' ids are kept: a retry
    assert requests_billed(seen) == SEEN_MOST + 10 and seen.seen() == SEEN_MOST
    assert seen.demand(1000.0 + 900.0 + SEEN_MARGIN_S + 1, since=0.0) == {} and seen.seen() == 0


def test_an_envoy_flooding_fake_admissions_only_raises_existing_keys_charges_within_bounds():
    """An authenticated Envoy reporting what it likes (many admissions under fresh request ids,
    huge audio-seconds, unknown keys, node ids of its own making, another Envoy's request ids):
    only keys that exist are charged, the charge and the debt stop at their caps, no other key's
    charge falls, and what the plane holds stays bounded."""
    plans = {"key-a": PLAN, "key-b": PLAN}

    def plane():
        keeper, seen, clock, published = keeper_for(plans, envoys=2)
        servicer = AccessLogServicer(Outcomes(), Metering(), InFlight(), lambda: clock.now, lambda: None,
                                     lambda: Known(keys=frozenset(plans), max_audio_s=14400.0),
                                     arrived=seen.arrived, charged=seen.charged_after)
        clock.now += DEMAND_WINDOW_S
        return keeper, seen, clock, published, servicer

    def legit(servicer):  # key-b's own traffic at envoy-1
        servicer.take([entry(TRY_STARTED, f"b{i}", "key-b", "2") for i in range(10)], 1, "envoy-1", "envoy-1")

    calm, _, _, calm_published, calm_servicer = plane()
    legit(calm_servicer)
    asyncio.run(calm.round())

    keeper, seen, clock, published, servicer = plane()
    servicer.take([entry(TRY_STARTED, f"b{i}", "key-a", "2") for i in range(10)]  # envoy-1's ids, first
                  + [entry(TRY_STARTED, f"fake-{i}", "key-a", "1e300") for i in range(20_000)]
                  + [entry(TRY_STARTED, f"forged-{i}", "key-forged", "60") for i in range(1000)], 2, "evil", "evil")
    for i in range(MOST_ENVOYS + 100):  # a stream per node id it makes up
        servicer.take([entry(TRY_STARTED, f"n{i}", "key-a", "5"), entry(REQUEST_ENDED, f"m{i}", "key-a", "5",
                                                                       limited=AUDIO_SECONDS_LIMIT)],
                      3 + i, "evil", f"evil.{i}")
    legit(servicer)
    asyncio.run(keeper.round())

    assert set(keeper.ledgers) == {"key-a", "key-b"} and set(published[-1]) == {"key-a", "key-b"}
    most_charge = 2 * BUDGET_SCALE / (1 - MOST_HELD_BACK)  # the Envoys' count, with the most held back for debt
    assert all(charged <= most_charge + 1 for charged in (published[-1]["key-a"].requests_charge,
                                                          published[-1]["key-a"].audio_charge))
    for name, amount in ((REQUESTS_LIMIT, PLAN.requests_per_minute), (AUDIO_SECONDS_LIMIT, PLAN.audio_seconds_per_minute)):
        assert keeper.ledgers["key-a"][name].debt(clock.now) <= MOST_OWED_MINUTES * 2 * amount
        assert keeper.ledgers["key-b"][name].debt(clock.now) >= calm.ledgers["key-b"][name].debt(clock.now)
    flooded, before = published[-1]["key-b"], calm_published[-1]["key-b"]
    assert flooded.requests_charge >= before.requests_charge and flooded.audio_charge >= before.audio_charge
    assert seen.envoys() <= MOST_ENVOYS + 1 and seen.seen() <= SEEN_MOST
    assert len(seen.window) <= DEMAND_WINDOW_S + 1
    assert all(len(counts) <= len(plans) * (MOST_ENVOYS + 1) for _, counts in seen.window)
    clock.now += 60 * MOST_OWED_MINUTES * 2  # every Envoy's minute repaid: owed no more
    asyncio.run(keeper.round())
    assert published[-1] == {} and all(ledger.debt(clock.now) == 0 for ledger in keeper.ledgers["key-a"].values())
