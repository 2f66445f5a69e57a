"""Run `python -m ncal_core.train|infer` many times fast: import the dependencies once, then fork one child per run.

A cold `python -m ncal_core.train` spends over two CPU-seconds importing torch and transformers before it
reads a flag; a table of fifty bad inputs would take minutes. This server imports every ncal_core module
except the two commands, computes nothing (so forking is safe), and runs each request in a forked child
exactly as `python -m` runs a module: runpy with run_name "__main__", the command's own stdout/stderr
files, environment, working directory and argv; an uncaught exception prints its traceback and exits 1,
as the interpreter does.

Protocol: one JSON request per line on stdin, {"id", "module", "argv", "env", "cwd", "stdout", "stderr"};
after stdin closes, every request has been answered with one JSON line on stdout, {"id", "returncode"}.
Usage: python tests/warm_commands.py [max_children]; `run_warm` runs a list of requests through it.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

# run as modules; `ncal_core.train` runs its __main__
COMMANDS = {"ncal_core.infer", "ncal_core.analyze", "ncal_core.export", "ncal_core.serve"}


def preload() -> None:
    """Import what the commands import, without running any command module."""
    import ncal_core

    for info in pkgutil.walk_packages(ncal_core.__path__, "ncal_core."):
        if info.name not in COMMANDS and not info.name.endswith(".__main__"):
            importlib.import_module(info.name)


def child(request: dict) -> None:
    """Become the command: redirect, set up the process like `python -m`, run, exit with its code."""
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]
    sys.argv = [request["module"], *request["argv"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (what the interpreter does with an uncaught exception)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_warm(requests: list[dict], env: dict[str, str], cwd: Path, at_once: int = 3) -> dict[str, int]:
    """Run the requests through this server, `at_once` at a time; returns each one's exit code by id."""
    server = subprocess.run([sys.executable, __file__, str(at_once)], capture_output=True, text=True, cwd=cwd,
                            input="".join(json.dumps(r) + "\n" for r in requests), env=env, timeout=600)
    assert server.returncode == 0, server.stderr
    return {a["id"]: a["returncode"] for a in map(json.loads, server.stdout.splitlines())}


def main() -> None:
    max_children = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    preload()
    running: dict[int, str] = {}

    def reap_one() -> None:
        pid, status = os.wait()
        print(json.dumps({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)}), flush=True)

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        while len(running) >= max_children:
            reap_one()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(request)
        running[pid] = request["id"]
    while running:
        reap_one()


if __name__ == "__main__":
    main()
