"""The job state machine (``services.jobs.job``): QEMU 7.2's transition and verb tables, the
refusals in QEMU's words, and what ``query-jobs`` shows."""

from __future__ import annotations

import pytest

from dirtybits.services.jobs import job as jobmod
from dirtybits.services.jobs.job import (
    TRANSITIONS,
    VERBS,
    JobError,
    JobState,
    JobStatus,
    JobTable,
    JobTransitionError,
    JobVerb,
)


def _doc_table(title: str) -> dict[str, frozenset[str]]:
    """A table of the module's docstring: row name -> the columns marked x."""
    doc = jobmod.__doc__ or ""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title)
                 and "U  C  R" in line)
    names = {"U": "undefined", "C": "created", "R": "running", "P": "paused", "Y": "ready",
             "S": "standby", "W": "waiting", "D": "pending", "X": "aborting",
             "E": "concluded", "N": "null"}
    cols = [c for c in lines[start].split() if c in names]
    out = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) != len(cols) + 1:
            break
        out[parts[0]] = frozenset(names[c] for c, m in zip(cols, parts[1:], strict=True)
                                  if m == "x")
    return out


def test_the_tables_are_the_documented_ones() -> None:
    """The docstring's tables (QEMU's JobSTT and JobVerbTable, as printed in job.c) and the
    code's dicts say the same, cell by cell."""
    stt = _doc_table("")
    assert {s.value: frozenset(t.value for t in targets)
            for s, targets in TRANSITIONS.items()} == stt
    verbs = _doc_table("verb")
    assert {v.value: frozenset(s.value for s in ok) for v, ok in VERBS.items()} == verbs


def test_a_backups_life_follows_the_table() -> None:
    seen: list[tuple[str, str]] = []
    job = JobState("j0", "backup", on_change=lambda j, old: seen.append((old.value,
                                                                         j.status.value)))
    for s in (JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.RUNNING, JobStatus.WAITING,
              JobStatus.PENDING, JobStatus.CONCLUDED, JobStatus.NULL):
        job.transition(s)
    assert seen[0] == ("created", "running") and seen[-1] == ("concluded", "null")
    with pytest.raises(JobTransitionError, match="no transition null -> running"):
        job.transition(JobStatus.RUNNING)
    bad = JobState("j1", "backup")
    with pytest.raises(JobTransitionError):
        bad.transition(JobStatus.CONCLUDED)  # created jobs abort or go null, never conclude


@pytest.mark.parametrize(("status", "verb", "ok"), [
    (JobStatus.RUNNING, JobVerb.PAUSE, True),
    (JobStatus.RUNNING, JobVerb.FINALIZE, False),
    (JobStatus.PENDING, JobVerb.FINALIZE, True),
    (JobStatus.CONCLUDED, JobVerb.DISMISS, True),
    (JobStatus.CONCLUDED, JobVerb.CANCEL, False),
    (JobStatus.WAITING, JobVerb.CANCEL, True),
    (JobStatus.RUNNING, JobVerb.COMPLETE, False),  # a backup is never ready: no complete
    (JobStatus.ABORTING, JobVerb.SET_SPEED, False),
])
def test_verbs_are_refused_in_qemus_words(status: JobStatus, verb: JobVerb, ok: bool) -> None:
    job = JobState("j0", "backup", status=status)
    if ok:
        job.check_verb(verb)
        return
    with pytest.raises(JobError) as err:
        job.check_verb(verb)
    assert str(err.value) == (f"Job 'j0' in state '{status.value}' cannot accept command "
                              f"verb '{verb.value}'")


def test_the_table_of_jobs() -> None:
    table = JobTable()
    assert table.query() == []
    with pytest.raises(JobError, match=r"^Job not found$"):  # QEMU 7.2's job-* text
        table.find("x")
    table.add(JobState("a", "backup", total_progress=10))
    b = JobState("b", "backup", status=JobStatus.RUNNING, current_progress=3)
    table.add(b)
    b.error = "No space left on device"
    assert table.query() == [
        {"id": "b", "type": "backup", "status": "running", "current-progress": 3,
         "total-progress": 0, "error": "No space left on device"},
        {"id": "a", "type": "backup", "status": "created", "current-progress": 0,
         "total-progress": 10}]
    with pytest.raises(JobError):
        table.add(JobState("a", "backup"))
    table.remove("a")
    assert [j["id"] for j in table.query()] == ["b"]
