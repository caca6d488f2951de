"""Runs LightX2V as its users do, in a process of its own: ``python tests/lightx2v_standalone.py SPEC.json``.

Not a test module and not teacal code: it imports only LightX2V (a checkout on PYTHONPATH, patched or not) and
refuses to run where teacal could be imported unless the spec allows it, so that what it shows is what a clean
LightX2V (plus, for the patch, ``integrations/lightx2v/qwen_image_tea.patch``) does on its own.

The spec names generations to run, each one ``{"via": "infer" | "pipeline", "args": [...] | {...}, "out": PNG}``:

* ``infer``: ``lightx2v.infer.main()`` with these command-line arguments (``python -m lightx2v.infer ARGS``), or,
  with ``"launcher": true``, ``teacache.lightx2v.main()`` (``python -m teacache.lightx2v ARGS``);
* ``pipeline``: ``LightX2VPipeline(**init)``, ``enable_cache(**cache)`` when given, ``create_generator(**create)``,
  then ``generate(**generate)``.

It writes ``{"logs": [loguru messages of each generation]}`` to the spec's ``"result"`` path (``{rank}`` in it: the
process's RANK, under torchrun).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    if not spec.get("teacal_allowed", False):
        present = [name for name in ("teacache", "calib") if importlib.util.find_spec(name) is not None]
        if present:
            raise SystemExit(f"teacal is importable here ({', '.join(present)}); this run must show LightX2V on its own")
    from loguru import logger

    messages: list[str] = []
    logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    logs = []
    for run in spec["runs"]:
        messages.clear()
        if run["via"] == "infer":
            sys.argv = ["lightx2v.infer", *run["args"]]
            if run.get("launcher"):
                from teacache.lightx2v import main as entry
            else:
                from lightx2v.infer import main as entry
            entry()
        else:
            from lightx2v import LightX2VPipeline

            pipe = LightX2VPipeline(**run["init"])
            if "cache" in run:
                pipe.enable_cache(**run["cache"])
            pipe.create_generator(**run["create"])
            pipe.generate(**run["generate"])
        logs.append(list(messages))
    with open(spec["result"].format(rank=os.environ.get("RANK", "0")), "w") as handle:
        json.dump({"logs": logs}, handle)


if __name__ == "__main__":
    main()
