"""Usage for billing (observe/usage.py, fleet/usage_store.py): per day, key and model, summed over
every writer's records; kept in the state dir across restarts."""

from __future__ import annotations

import asyncio

from control_plane.fleet.usage_store import FileUsageStore
from control_plane.observe.ledger import Ledger
from control_plane.observe.usage import FIGURES, as_csv, summed


def test_each_days_metering_is_a_record_of_this_writer_and_the_days_sum_over_writers():
    ledger = Ledger()
    ledger.meter("m", 10.0, False, "served", "k1", day="2026-12-06")
    ledger.meter("m", 5.0, True, "served", "k1", day="2026-12-07")
    ledger.meter("m", 2.0, False, "refused", "", day="2026-12-07")
    ledger.correct("m", 5.0, 60.0, "k1", day="2026-12-07")  # the engine's figure of a lying upload
    assert ledger.usage.take_changed() == ["2026-12-06", "2026-12-07"] and ledger.usage.take_changed() == []
    mine = ledger.usage.record("2026-12-07")
    assert mine["k1"]["m"]["audio_received_s"] == 60.0 and mine["k1"]["m"]["mismatches"] == 1
    other = {"k1": {"m": {"requests": 3, "audio_received_s": 30.0, "audio_served_s": 30.0}}}
    rows = summed({"2026-12-07": [mine, other]}, key="k1")
    assert rows == [{"day": "2026-12-07", "key": "k1", "model": "m", "requests": 4, "audio_received_s": 90.0,
                     "audio_served_s": 90.0, "audio_failed_s": 0.0, "audio_refused_s": 0.0, "audio_estimated_s": 5.0,
                     "audio_corrected_s": 55.0, "mismatches": 1}]
    assert as_csv(rows).splitlines() == ["day,key,model," + ",".join(FIGURES),
                                         "2026-12-07,k1,m,4,90.0,90.0,0.0,0.0,5.0,55.0,1"]


def test_a_damaged_record_counts_for_nothing():
    bad = {"k": {"m": {"requests": True, "audio_served_s": float("inf"), "audio_failed_s": "lots"}}, "j": "x"}
    assert summed({"2026-12-07": [bad]}) == [{"day": "2026-12-07", "key": "k", "model": "m",
                                             **{name: 0 if name in ("requests", "mismatches") else 0.0
                                                for name in FIGURES}}]


def test_a_correction_one_plane_metered_for_a_request_another_served_sums_to_the_engines_figure():
    served_here = {"k": {"m": {"requests": 1, "audio_received_s": 65.0, "audio_served_s": 65.0}}}
    corrected_there = {"k": {"m": {"audio_received_s": -4.0, "audio_served_s": -4.0, "audio_corrected_s": -4.0,
                                   "mismatches": 1}}}
    [row] = summed({"2026-12-07": [served_here, corrected_there]})
    assert (row["audio_served_s"], row["audio_corrected_s"], row["mismatches"]) == (61.0, -4.0, 1)


def test_the_state_dir_keeps_every_writers_records_by_day_and_drops_old_days(tmp_path):
    store = FileUsageStore(tmp_path)

    async def scenario():
        await store.put("2026-12-06", "plane-1", {"k": {"m": {"requests": 1}}})
        await store.put("2026-12-07", "plane-1", {"k": {"m": {"requests": 2}}})
        await store.put("2026-12-07", "plane-2", {"k": {"m": {"requests": 3}}})  # a restart: another writer
        await store.put("2026-12-07", "plane-1", {"k": {"m": {"requests": 4}}})  # rewritten, cumulative
        (tmp_path / "usage" / "2026-12-07" / "broken.json").write_text("{not json")
        every = await FileUsageStore(tmp_path).records("2026-12-01", "2026-12-31")
        await store.drop_before("2026-12-07")
        return every, await store.records("2026-12-01", "2026-12-31")

    every, kept = asyncio.run(scenario())
    assert sorted(every["2026-12-07"]) == ["broken", "plane-1", "plane-2"]
    assert [(row["day"], row["requests"]) for row in summed({d: w.values() for d, w in every.items()})] == [
        ("2026-12-06", 1), ("2026-12-07", 7)]
    assert list(kept) == ["2026-12-07"]
