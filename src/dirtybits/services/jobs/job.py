"""QEMU's job state machine (``job.c``): statuses, verbs, and which are allowed when.

A job moves through ``JobStatus`` values only along ``TRANSITIONS`` (QEMU's ``JobSTT``), and
accepts a verb (a QMP command on it) only in the statuses ``VERBS`` allows (``JobVerbTable``);
anything else is refused with QEMU's text. The tables are QEMU 7.2's, row by row::

                 U  C  R  P  Y  S  W  D  X  E  N
    undefined    .  x  .  .  .  .  .  .  .  .  .
    created      .  .  x  .  .  .  .  .  x  .  x
    running      .  .  .  x  x  .  x  .  x  .  .
    paused       .  .  x  .  .  .  .  .  .  .  .
    ready        .  .  .  .  .  x  x  .  x  .  .
    standby      .  .  .  .  x  .  .  .  .  .  .
    waiting      .  .  .  .  .  .  .  x  x  .  .
    pending      .  .  .  .  .  .  .  .  x  x  .
    aborting     .  .  .  .  .  .  .  .  x  x  .
    concluded    .  .  .  .  .  .  .  .  .  .  x
    null         .  .  .  .  .  .  .  .  .  .  .

    verb         U  C  R  P  Y  S  W  D  X  E  N
    cancel       .  x  x  x  x  x  x  x  .  .  .
    pause        .  x  x  x  x  x  .  .  .  .  .
    resume       .  x  x  x  x  x  .  .  .  .  .
    set-speed    .  x  x  x  x  x  .  .  .  .  .
    complete     .  .  .  .  x  .  .  .  .  .  .
    finalize     .  .  .  .  .  .  .  x  .  .  .
    dismiss      .  .  .  .  .  .  .  .  .  x  .

This module is the tables and the checks (no I/O, no clock); the job runner and the job types
(``blockdev-backup``) build on it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from dirtybits.errors import DirtybitsError


class JobStatus(enum.Enum):
    """QAPI ``JobStatus``, in QEMU's order."""

    UNDEFINED = "undefined"
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class JobVerb(enum.Enum):
    """QAPI ``JobVerb`` (QEMU 7.2)."""

    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    SET_SPEED = "set-speed"
    COMPLETE = "complete"
    FINALIZE = "finalize"
    DISMISS = "dismiss"


S = JobStatus
_ORDER = list(JobStatus)


def _row(bits: str) -> frozenset[JobStatus]:
    return frozenset(s for s, b in zip(_ORDER, bits.split(), strict=True) if b == "1")


#: QEMU's ``JobSTT``: the statuses each status may move to.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.UNDEFINED: _row("0 1 0 0 0 0 0 0 0 0 0"),
    S.CREATED: _row("0 0 1 0 0 0 0 0 1 0 1"),
    S.RUNNING: _row("0 0 0 1 1 0 1 0 1 0 0"),
    S.PAUSED: _row("0 0 1 0 0 0 0 0 0 0 0"),
    S.READY: _row("0 0 0 0 0 1 1 0 1 0 0"),
    S.STANDBY: _row("0 0 0 0 1 0 0 0 0 0 0"),
    S.WAITING: _row("0 0 0 0 0 0 0 1 1 0 0"),
    S.PENDING: _row("0 0 0 0 0 0 0 0 1 1 0"),
    S.ABORTING: _row("0 0 0 0 0 0 0 0 1 1 0"),
    S.CONCLUDED: _row("0 0 0 0 0 0 0 0 0 0 1"),
    S.NULL: _row("0 0 0 0 0 0 0 0 0 0 0"),
}

#: QEMU's ``JobVerbTable``: the statuses in which each verb is accepted.
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _row("0 1 1 1 1 1 1 1 0 0 0"),
    JobVerb.PAUSE: _row("0 1 1 1 1 1 0 0 0 0 0"),
    JobVerb.RESUME: _row("0 1 1 1 1 1 0 0 0 0 0"),
    JobVerb.SET_SPEED: _row("0 1 1 1 1 1 0 0 0 0 0"),
    JobVerb.COMPLETE: _row("0 0 0 0 1 0 0 0 0 0 0"),
    JobVerb.FINALIZE: _row("0 0 0 0 0 0 0 1 0 0 0"),
    JobVerb.DISMISS: _row("0 0 0 0 0 0 0 0 0 1 0"),
}


class JobError(DirtybitsError):
    """A job command refused (QEMU's text)."""


class JobTransitionError(DirtybitsError):
    """A status change the table forbids: a bug in the job runner, never a user's doing."""


@dataclass
class JobState:
    """One job's identity and status as QEMU keeps it; ``on_change(job, old)`` hears every
    status change (the runner turns them into ``JOB_STATUS_CHANGE`` events)."""

    id: str
    type: str  # QAPI JobType: "backup", ...
    status: JobStatus = JobStatus.CREATED
    current_progress: int = 0
    total_progress: int = 0
    error: str | None = None
    auto_finalize: bool = True
    auto_dismiss: bool = True
    on_change: Callable[[JobState, JobStatus], None] | None = field(default=None, repr=False)

    def transition(self, new: JobStatus) -> None:
        """Move to ``new``. Raises ``JobTransitionError`` where QEMU's table says no."""
        old = self.status
        if new not in TRANSITIONS[old]:
            raise JobTransitionError(f"job '{self.id}': no transition {old.value} -> "
                                     f"{new.value}")
        self.status = new
        if self.on_change is not None and new is not old:
            self.on_change(self, old)

    def check_verb(self, verb: JobVerb) -> None:
        """Raises ``JobError`` with QEMU's text unless the status takes ``verb``."""
        if self.status not in VERBS[verb]:
            raise JobError(f"Job '{self.id}' in state '{self.status.value}' cannot accept "
                           f"command verb '{verb.value}'")

    def info(self) -> dict[str, object]:
        """``query-jobs``' ``JobInfo``."""
        out: dict[str, object] = {"id": self.id, "type": self.type,
                                  "status": self.status.value,
                                  "current-progress": self.current_progress,
                                  "total-progress": self.total_progress}
        if self.error is not None:
            out["error"] = self.error
        return out


class JobTable:
    """The daemon's jobs by id (QEMU's job list, newest first in queries)."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobState] = {}

    def add(self, job: JobState) -> None:
        if job.id in self.jobs:
            raise JobError(f"Job ID '{job.id}' already in use")
        self.jobs[job.id] = job

    def remove(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def find(self, job_id: str) -> JobState:
        """The job ``job_id`` (``job-*`` commands). Raises ``JobError``: "Job not found"."""
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError("Job not found")
        return job

    def query(self) -> list[dict[str, object]]:
        return [job.info() for job in reversed(self.jobs.values())]


__all__ = ["TRANSITIONS", "VERBS", "JobError", "JobState", "JobStatus", "JobTable",
           "JobTransitionError", "JobVerb"]
