"""Sharded batches and derived idempotency keys, in process (issue 20).

``--shard K/N`` / ``auto`` parsing and refusal before any request, the stable partition
by job id, per-shard folders and ``apimart merge``, and keys that depend on (batch id,
job id, request) only, so that a run without its journal sends the same keys again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apimart_async.cli._batch import BatchSettings, KeyBodyMismatch, _Active, _Run, _split_rate
from apimart_async.cli._jobfile import JobLine
from apimart_async.cli._keys import canonical, derived_key
from apimart_async.cli._setup import Runtime
from apimart_async.cli._shard import Shard, parse_shard
from apimart_async.cli._ui import Ui
from apimart_async.models import parse_request
from apimart_async.testing import FakeApimart

from .images import png
from .test_cli_batch import GEM, cli, jobs, journal, results, write_jobs

K8S = {"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": "4"}
SLURM = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}


# -- the spec -------------------------------------------------------------------------


def test_shard_specs_and_the_environment_of_each_engine() -> None:
    """K/N counts K from 0; auto reads Kubernetes' or Slurm's variables."""
    assert parse_shard("0/4") == Shard(0, 4) and parse_shard(" 3 / 4 ") == Shard(3, 4)
    assert parse_shard("auto", K8S) == Shard(2, 4)
    assert parse_shard("auto", SLURM) == Shard(2, 4)  # 7 - 5
    without_min = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert parse_shard("auto", without_min) == Shard(3, 4)  # MIN unset: 0


@pytest.mark.parametrize(
    ("spec", "env", "says"),
    [
        ("4/4", {}, "must be below N"),
        ("x/y", {}, "K/N"),
        ("-1/4", {}, "K/N"),
        ("0/0", {}, "at least 1"),
        ("1", {}, "K/N"),
        ("auto", {}, "neither JOB_COMPLETION_INDEX"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, "JOB_COMPLETIONS is not"),
        ("auto", {"JOB_COMPLETION_INDEX": "a", "JOB_COMPLETIONS": "2"}, "must be an integer"),
        ("auto", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"}, "below N"),
    ],
)
def test_an_invalid_spec_names_shard(spec: str, env: dict[str, str], says: str) -> None:
    """Every invalid spec is a ValueError naming --shard and what is wrong."""
    with pytest.raises(ValueError, match="--shard") as info:
        parse_shard(spec, env)
    assert says in str(info.value)


@pytest.mark.parametrize("spec", ["4/4", "x/y", "auto"])
def test_an_invalid_shard_exits_2_before_any_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str
) -> None:
    """The command line refuses it with status 2, naming --shard; nothing is sent."""
    for name in ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(2))
    ran = cli("batch", str(src), "--out", str(tmp_path / "out"), "--shard", spec, fake=fake)
    assert ran.code == 2 and "argument --shard" in ran.err  # argparse's, on the command's stderr
    assert fake.stats.requests_total == 0 and not (tmp_path / "out").exists()


def test_totals_are_split_across_shards() -> None:
    """--concurrency and --poll-rps are totals: each shard takes its share."""
    shares = [Shard(k, 3).share(32) for k in range(3)]
    assert shares == [11, 11, 10] and sum(shares) == 32
    assert Shard(5, 8).share(4) == 1  # at least one job at a time
    assert _split_rate(30.0, Shard(0, 3), fake=False) == 10.0
    assert _split_rate(None, Shard(1, 2), fake=False) == 25.0  # the library's 50/s, halved
    assert _split_rate(None, Shard(1, 2), fake=True) is None  # the fake has no budget
    assert _split_rate(7.0, None, fake=False) == 7.0


# -- the partition --------------------------------------------------------------------


def test_every_job_lands_in_exactly_one_shard_whatever_the_order(tmp_path: Path) -> None:
    """Three shards over a file, then over the same file reversed: each job is in exactly
    one shard's results, the same shard both times; merge combines them."""
    fake = FakeApimart()
    lines = jobs(30)
    placed: list[dict[str, int]] = []
    for name, order in (("a", lines), ("b", lines[::-1])):
        src = write_jobs(tmp_path / f"{name}.jsonl", order)
        out = tmp_path / f"out-{name}"
        where: dict[str, int] = {}
        for k in range(3):
            ran = cli("batch", str(src), "--out", str(out), "--shard", f"{k}/3", fake=fake)
            assert ran.code == 0, ran.err
            for row in results(out / f"shard-{k}-of-3"):
                assert row["id"] not in where
                where[row["id"]] = k
                assert (out / f"shard-{k}-of-3" / row["files"][0]).is_file()
        assert len(where) == 30
        placed.append(where)
        merged = cli("merge", str(out))
        assert merged.code == 0, merged.err
        rows = results(out)
        assert [r["id"] for r in rows] == [line["id"] for line in order]
        assert all((out / r["files"][0]).is_file() for r in rows)
    assert placed[0] == placed[1]
    assert all(Shard(k, 3).owns(job) for job, k in placed[0].items())
    assert len(set(placed[0].values())) == 3


def test_merge_lists_every_job_no_shard_finished(tmp_path: Path) -> None:
    """A shard that never ran: merge exits 1 and prints the id of each of its jobs
    (found from the batch file the other shards recorded) and of an invalid line."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", [*jobs(12), "{broken"])
    out = tmp_path / "out"
    for k in (0, 2):
        cli("batch", str(src), "--out", str(out), "--shard", f"{k}/3", fake=fake)

    merged = cli("merge", str(out))

    assert merged.code == 1
    expected = {f"j{i}" for i in range(12) if Shard(1, 3).owns(f"j{i}")}
    printed = set(merged.out.split())
    assert expected <= printed and "shard 1/3 has no results" in merged.err
    rows = {r["id"]: r for r in results(out)}
    assert all(rows[job]["status"] == "missing" for job in expected)
    assert sum(r["status"] == "done" for r in rows.values()) == 12 - len(expected)


def test_a_folder_holds_one_split_only(tmp_path: Path) -> None:
    """An unsharded run into a sharded folder, or another N, is refused (status 3)."""
    fake = FakeApimart()
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(4))
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), "--shard", "0/2", fake=fake).code == 0
    plain = cli("batch", str(src), "--out", str(out), fake=fake)
    assert plain.code == 3 and "split into 2 shards" in plain.err
    other = cli("batch", str(src), "--out", str(out), "--shard", "0/3", fake=fake)
    assert other.code == 3 and "2-way split" in other.err


# -- derived keys ---------------------------------------------------------------------


def _keys(out: Path) -> dict[str, str]:
    return {job: row["idempotency_key"] for job, row in journal(out).items()}


def test_keys_survive_a_lost_journal_and_follow_the_request(tmp_path: Path) -> None:
    """Same --batch-id: a job whose line is unchanged keeps its key although other lines
    changed and moved, so a run without the journal (a new folder) gets the service's
    replay instead of a new task; an edited line gets a new key and a new task."""
    fake = FakeApimart()  # honours keys
    first = jobs(6)
    src = write_jobs(tmp_path / "jobs.jsonl", first)
    a = tmp_path / "a"
    assert cli("batch", str(src), "--out", str(a), "--batch-id", "run-1", fake=fake).code == 0
    assert fake.stats.tasks_created == 6

    second = [dict(line) for line in first[::-1]]  # moved
    second[0]["prompt"] = "edited"  # j5 changes
    second.append({"id": "j6", "model": GEM, "prompt": "new"})
    write_jobs(src, second)
    b = tmp_path / "b"  # no journal: another machine, a replaced pod
    assert cli("batch", str(src), "--out", str(b), "--batch-id", "run-1", fake=fake).code == 0

    before, after = _keys(a), _keys(b)
    assert all(after[f"j{i}"] == before[f"j{i}"] for i in range(5))
    assert after["j5"] != before["j5"]
    assert fake.stats.tasks_created == 6 + 2  # j5 edited, j6 new; the rest replayed
    assert fake.stats.replays == 5 and not fake.duplicate_keys()

    c = tmp_path / "c"  # default batch id: a hash of the file, which changed
    assert cli("batch", str(src), "--out", str(c), fake=fake).code == 0
    assert set(_keys(c).values()).isdisjoint(after.values())


def test_a_retried_job_gets_a_new_key(tmp_path: Path) -> None:
    """A failed task is refunded: its retry is one generation on, under a new key."""
    fake = FakeApimart()
    fake.script("task", ["task_failed"])
    src = write_jobs(tmp_path / "jobs.jsonl", jobs(1))
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 1
    key = journal(out)["j0"]["idempotency_key"]
    assert cli("batch", str(src), "--out", str(out), fake=fake).code == 0
    row = journal(out)["j0"]
    assert row["idempotency_key"] != key and row["generation"] == 1
    assert fake.stats.tasks_created == 2 and not fake.duplicate_keys()


def test_a_job_with_a_local_image_gets_a_random_key(tmp_path: Path) -> None:
    """Its upload URL is part of the body and differs per upload: no derived key."""
    (tmp_path / "ref.png").write_bytes(png())
    src = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"id": "r", "model": GEM, "prompt": "x", "image_urls": ["ref.png"]}, *jobs(1)],
    )
    out = tmp_path / "out"
    assert cli("batch", str(src), "--out", str(out), fake=FakeApimart()).code == 0
    keys = _keys(out)
    assert keys["r"].startswith("apimart-cli-") and not keys["j0"].startswith("apimart-cli-")


def test_a_derived_key_is_never_sent_with_another_body(tmp_path: Path) -> None:
    """The submit watch compares the body about to be sent with the one the key was
    derived for, and refuses to send a different one."""
    request = parse_request({"model": GEM, "prompt": "a fox"})
    derived = derived_key("b", "j0", request, 0)
    assert derived is not None
    key, body = derived
    assert body == canonical(request.to_body())
    run = _Run(BatchSettings(tmp_path / "x.jsonl", tmp_path), Ui(), Runtime())
    run.journal = object()  # type: ignore[assignment]  # never reached: refused first
    active = _Active(JobLine(1, "j0", request, "f"), key, expect=body, resume=None, generation=0)
    run.by_key[key] = active
    other = json.dumps({**json.loads(body), "prompt": "a wolf"}).encode()
    with pytest.raises(KeyBodyMismatch, match="not sending idempotency key"):
        run.on_submit(key, other)
    assert active.sent is None
