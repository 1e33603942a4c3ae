"""What every part of the example shares: the Redis URL, the queue's name and
the channel a finished report is announced on."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
QUEUE = "reports"
JOB_TIMEOUT = 60     # seconds a report may take before RQ stops it


def channel(job_id: str) -> str:
    """The Redis pub/sub channel the job publishes its result on."""
    return f"reports:{job_id}:done"
