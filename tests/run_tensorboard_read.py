"""Read a run's tensorboard event files with tensorboard's own reader (run by tests/test_loggers.py in a fresh
process, tensorboard on PYTHONPATH), as `tensorboard --logdir` would show them.

    python tests/run_tensorboard_read.py <log dir> <out.json>

Writes {"tensorboard": version, "scalars": {tag: [[step, value], ...]}} to out.json."""

import json
import sys

import tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

log_dir, out = sys.argv[1:3]
events = EventAccumulator(log_dir)
events.Reload()
scalars = {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
with open(out, "w", encoding="utf-8") as f:
    json.dump({"tensorboard": tensorboard.__version__, "scalars": scalars}, f)
