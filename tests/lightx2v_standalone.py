"""Runs LightX2V as its users do, in a process of its own: ``python tests/lightx2v_standalone.py SPEC.json``.

Not a test module and not teacal code: it imports only LightX2V (a checkout on PYTHONPATH, patched or not) and
refuses to run where teacal could be imported unless the spec allows it, so that what it shows is what a clean
LightX2V (plus, for the patch, ``integrations/lightx2v/qwen_image_tea.patch``) does on its own.

The spec names generations to run, each one ``{"via": "infer" | "pipeline", "args": [...] | {...}, "out": PNG}``:

* ``infer``: ``lightx2v.infer.main()`` with these command-line arguments (``python -m lightx2v.infer ARGS``), or,
  with ``"launcher": true``, ``teacache.lightx2v.main()`` (``python -m teacache.lightx2v ARGS``);
* ``pipeline``: ``LightX2VPipeline(**init)``, ``enable_cache(**cache)`` when given, ``create_generator(**create)``,
  then ``generate(**generate)`` when given;
* with ``"expect_error": "TypeName"``, the run must fail with that exception; its log is then ``["error: <message>"]``.

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
        if "expect_error" in run:  # a run that must fail: its error's one line is its log
            try:
                generate(run)
            except Exception as err:  # noqa: BLE001 - the type is checked right below
                if type(err).__name__ != run["expect_error"]:
                    raise
                logs.append([f"error: {err}"])
                continue
            raise SystemExit(f"expected {run['expect_error']}, but the run succeeded")
        generate(run)
        logs.append(list(messages))
    with open(spec["result"].format(rank=os.environ.get("RANK", "0")), "w") as handle:
        json.dump({"logs": logs}, handle)


def generate(run: dict) -> None:
    if run["via"] == "infer":
        sys.argv = ["lightx2v.infer", *run["args"]]
        if run.get("launcher"):
            from teacache.lightx2v import main as entry
        else:
            from lightx2v.infer import main as entry
        entry()
        return
    from lightx2v import LightX2VPipeline

    pipe = LightX2VPipeline(**run["init"])
    if "cache" in run:
        pipe.enable_cache(**run["cache"])
    pipe.create_generator(**run["create"])
    if "generate" in run:
        pipe.generate(**run["generate"])


if __name__ == "__main__":
    main()
