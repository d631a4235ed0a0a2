"""A sweep worker: `python -m linmix.tasks.worker` runs the jobs it reads from stdin, one at a time.

The protocol is JSON lines. In: {"kind": "run", "spec": {...}} or {"kind": "probe", "spec": {...},
"steps": N, "barrier": {"dir": ..., "count": ...} or absent}. Out, on the original stdout:
{"event": "eval", ...} after each evaluation of a run, then {"event": "done", "result": {...}} or
{"event": "error", "message": ..., "traceback": ...}. Everything else the process prints goes to
stderr (the runner's log of this worker). A worker keeps the generated data between jobs, so later
runs of the same cell start at once.
"""

import json
import os
import sys
import traceback


def main() -> int:
    """Serve jobs from stdin until it closes."""
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # stray output, from Python or C, lands in the log rather than in the protocol
    sys.stdout = sys.stderr

    from linmix.tasks.train import DataCache, probe_run, train_run

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    cache = DataCache()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            if job["kind"] == "run":
                result = train_run(job["spec"], report=lambda event: send({"event": "eval", **event}), cache=cache)
            else:
                result = probe_run(job["spec"], job["steps"], cache=cache, barrier=job.get("barrier"))
        except Exception as error:  # reported to the runner, which records the run as failed
            traceback.print_exc()
            send({"event": "error", "message": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        else:
            send({"event": "done", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
