"""Read an offline SwanLab run's scalars with swanlab's own record reader, the one `swanlab sync` uploads from (run by
tests/test_loggers.py in a fresh process, swanlab on PYTHONPATH).

    python tests/run_swanlab_read.py <run's out_dir> <out.json>

Writes {"swanlab": version, "runs": n, "scalars": {key: [[step, value], ...]}} to out.json."""

import glob
import json
import os
import sys

import swanlab
from swanlab.proto.swanlab.record.v1.record_pb2 import Record
from swanlab.sdk.internal.core_python.store import DataStoreReader

log_dir, out = sys.argv[1:3]
files = glob.glob(os.path.join(log_dir, "run-*", "run-*.swanlab"))
scalars = {}
for path in files:
    reader = DataStoreReader()
    reader.open(path)
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            scalars.setdefault(record.scalar.key, []).append([record.scalar.step, record.scalar.value.number])
    reader.close()
with open(out, "w", encoding="utf-8") as f:
    json.dump({"swanlab": swanlab.__version__, "runs": len(files), "scalars": scalars}, f)
