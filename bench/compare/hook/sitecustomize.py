"""Step-time recorder for the side-by-side benchmark; loaded by Python at start-up (PYTHONPATH=this folder).

All three trainers advance a tqdm bar once per optimizer step, so the wall-clock time of every `update`
gives the same steps/s measure for each of them without touching their code. Each update appends
"<unix time> <bar position> <bar total> <bar description>" to the file named by COMPARE_STEP_LOG.
Nothing happens when COMPARE_STEP_LOG is unset. An existing sitecustomize further along sys.path still runs.
"""

import os
import sys
import time


def _install(path: str) -> None:
    import tqdm.std

    log = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered: survives a killed run
    update = tqdm.std.tqdm.update

    def timed_update(self, n=1):
        result = update(self, n)
        desc = str(getattr(self, "desc", "") or "-").replace(" ", "_").rstrip(":") or "-"
        log.write(f"{time.time():.6f} {self.n} {self.total} {desc}\n")
        return result

    tqdm.std.tqdm.update = timed_update


def _chain() -> None:
    """Run the sitecustomize that this file shadows, if the machine has one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                exec(
                    compile(f.read(), candidate, "exec"), {"__name__": "sitecustomize", "__file__": candidate}
                )
            return


if os.environ.get("COMPARE_STEP_LOG"):
    try:
        _install(os.environ["COMPARE_STEP_LOG"])
    except Exception as error:  # never break the tool being measured
        print(f"[compare hook] not installed: {error!r}", file=sys.stderr)
_chain()
