"""Stand-in chat worker: answers the Studio's JSON-lines protocol with a canned, side-specific reply."""

import json
import sys
import threading
import time

out = sys.stdout
cancelled = set()
lock = threading.Lock()
pending = []
cond = threading.Condition()


def emit(**msg):
    with lock:
        out.write(json.dumps(msg) + "\n")
        out.flush()


def reader():
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("op") == "cancel":
            cancelled.add(msg["id"])
        else:
            with cond:
                pending.append(msg)
                cond.notify()
    with cond:
        pending.append(None)
        cond.notify()


threading.Thread(target=reader, daemon=True).start()
while True:
    with cond:
        while not pending:
            cond.wait()
        msg = pending.pop(0)
    if msg is None:
        break
    rid = msg["id"]
    if msg["load"]["model"].endswith("crash"):
        print("fake chat worker crashing", file=sys.stderr, flush=True)
        sys.exit(3)
    emit(id=rid, type="status", text="Loading model…")
    emit(id=rid, type="loaded", spec={**msg["load"], "side": msg["side"]})
    last = msg["messages"][-1]["content"]
    words = f"[{msg['side']}] You said: {last}. This is a streamed reply.".split(" ")
    delay = float(msg["params"].get("temperature", 0)) * 0  # deterministic, fast
    for i, w in enumerate(words):
        if rid in cancelled:
            break
        emit(id=rid, type="token", text=(" " if i else "") + w)
        time.sleep(0.01 + delay)
    emit(id=rid, type="done", cancelled=rid in cancelled, pieces=len(words))
