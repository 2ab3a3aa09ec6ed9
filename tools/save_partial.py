"""Copy a training run that is still going (or was cut off) into checkpoints/NAME.partial/.

    python tools/save_partial.py runs/NAME [runs/OTHER ...]

runs/ is not committed and a session ends by killing its commands, so each session ends by saving
the runs in progress here; tools/runs.sh resumes them from that folder in the next session. The
copy is safe while the run trains: state.pt is replaced atomically, the copy's checksum is checked,
and the log is cut at the copied state's step (records after it would be trained again on resume).
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from sparsesr.train.state import load_train_state

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


def save_partial(run: Path) -> tuple[Path, int]:
    """Copy ``run``'s state, config and log (cut at the state's step); return (folder, step)."""
    target = CHECKPOINTS / f"{run.name}.partial"
    with tempfile.TemporaryDirectory(dir=CHECKPOINTS) as scratch:
        staged = Path(scratch) / run.name
        staged.mkdir()
        shutil.copyfile(run / "state.pt", staged / "state.pt")
        state, verified = load_train_state(staged / "state.pt")  # raises on a torn or corrupt copy
        if not verified:
            raise SystemExit(f"{run}/state.pt has no checksum: refusing to commit an unverifiable state")
        step = int(state["step"])
        shutil.copyfile(run / "config.json", staged / "config.json")
        lines = (run / "log.jsonl").read_text().splitlines() if (run / "log.jsonl").exists() else []
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        (staged / "log.jsonl").write_text("".join(line + "\n" for line in kept))
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target, step


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for run in map(Path, argv):
        if not (run / "state.pt").is_file():
            print(f"{run}: no state.pt (not a run, or it has not saved yet)", file=sys.stderr)
            return 1
        target, step = save_partial(run)
        print(f"{run} -> {target.relative_to(CHECKPOINTS.parent)} at step {step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
