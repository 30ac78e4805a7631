"""The build's import check: ``python -I -B -m workers.import_check ROOT FILE FUNCTION``.

It loads the model with ``workers.loader``, as a replica and the exported image will,
in a fresh interpreter: ``-I`` keeps PYTHONPATH and the user's site out, ``-B`` keeps
bytecode out of the artifact. It writes one JSON object to its original stdout,
``{"ok": true}`` or ``{"ok": false, "error": "<one line>"}``; everything else (what the
model prints, the traceback of a failure) goes to stderr, which the build logs.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from workers import loader


def check(root: str, file_path: str, function_name: str) -> dict[str, object]:
    """The check's result; the traceback of a failure is printed to stderr."""
    try:
        loader.load(root, file_path, function_name)
    except loader.LoadFailed as e:
        cause = e.__cause__
        if cause is not None:
            traceback.print_exception(type(cause), cause, cause.__traceback__)
        return {"ok": False, "error": e.reason}
    return {"ok": True}


def main() -> None:
    root, file_path, function_name = sys.argv[1:4]
    result = os.fdopen(os.dup(1), "w")  # the original stdout: for the result only
    os.dup2(2, 1)  # the model's prints go to stderr, into the build log
    report = check(root, file_path, function_name)
    result.write(json.dumps(report))
    result.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: threads the model started, or its atexit hooks, must not hold
    # the build until its deadline.
    os._exit(0)


if __name__ == "__main__":
    main()
