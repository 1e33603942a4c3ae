"""The job the consumers run (RQ imports it as ``jobs.make_report``).

A report is slow work: ``seconds`` of it (time.sleep stands for the real
thing), then a result.  When it is done, the job announces its result on the
report's channel, so that a client waiting on the WebSocket gets it at once.
RQ keeps the return value too (``GET /reports/ID``).
"""

from __future__ import annotations

import json
import os
import time

from rq import get_current_job
from shared import channel


def make_report(name: str, seconds: float = 0.2) -> dict:
    time.sleep(seconds)
    result = {"report": name, "rows": len(name) * 7, "made_by": os.getpid()}
    job = get_current_job()
    if job is not None:
        job.connection.publish(channel(job.id), json.dumps(result))
    return result
