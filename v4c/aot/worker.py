"""An AOT worker process: captures and compiles kernel launches on request, one JSON line each way.

Started by ``pool.py`` as ``python -m v4c.aot.worker`` with Triton's interpreter off. Requests:

* ``{"id", "cmd": "capture", "module", "task", "target"}`` -> ``{"id", "launches": [{"key", "kernel",
  "num_warps", "num_stages"}, ...]}``: the launches one call makes (``capture.capture``);
* ``{"id", "cmd": "compile", "module", "task", "target", "index"}`` -> ``{"id", "result": {...}}``:
  capture again (cheap, deterministic) and compile launch ``index`` (``launches.compile_launch``).

``module`` is ``{"path", "name", "sha256"}`` of a rendered kernel module; it is imported once per
process after its bytes match the hash. A failure answers ``{"id", "error"}``; the process goes on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import traceback
import warnings


def _main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else writes to stdout (the compiler's tools) must not mix into replies
    warnings.filterwarnings("ignore")
    from .capture import capture
    from .launches import compile_launch, describe, launch_key

    modules: dict[str, object] = {}

    def load(m: dict):
        if m["sha256"] not in modules:
            data = open(m["path"], "rb").read()
            if hashlib.sha256(data).hexdigest() != m["sha256"]:
                raise RuntimeError(f"{m['path']}: kernel module does not match its hash")
            spec = importlib.util.spec_from_file_location(m["name"], m["path"])
            mod = importlib.util.module_from_spec(spec)
            sys.modules[m["name"]] = mod
            spec.loader.exec_module(mod)
            modules[m["sha256"]] = mod
        return modules[m["sha256"]]

    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            launches = capture(load(req["module"]), req["task"], req["target"])
            if req["cmd"] == "capture":
                reply = {"launches": [{"key": launch_key(x, req["target"]), **describe(x)} for x in launches]}
            else:
                x = launches[req["index"]]
                reply = {"result": {"key": launch_key(x, req["target"]), **compile_launch(x, req["target"])}}
        except Exception as e:  # noqa: BLE001 - reported to the driver, which names the call site
            reply = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
        proto.write(json.dumps({"id": req["id"], **reply}) + "\n")


if __name__ == "__main__":
    _main()
