"""Stand-in export worker: RUN_DIR FORMAT OUT_DIR; format 'broken' fails."""

import shutil
import sys
from pathlib import Path

run_dir, fmt, out_dir = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
print(f"exporting {run_dir} as {fmt}", flush=True)
if fmt == "broken":
    print("ExportError: this format is broken on purpose", file=sys.stderr)
    sys.exit(1)
out_dir.mkdir(parents=True)
shutil.copytree(run_dir / "adapter", out_dir / "adapter")
(out_dir / "FORMAT.txt").write_text(fmt)
print("done", flush=True)
