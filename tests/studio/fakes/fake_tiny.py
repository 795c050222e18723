"""Stand-in for the tiny-model worker: writes a config.json and prints the folder as JSON."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps({"model_type": "gemma4", "fake": True}))
print(json.dumps({"path": str(out.resolve())}))
