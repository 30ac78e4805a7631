"""Loads a model's entry function from its artifact: the one way every runner does it.

The build's import check (``workers.import_check``), a serving replica
(``workers.model_app``) and the exported image's server (``workers.image_server``) all
call ``load``, so a model that passes the build loads the same way when it serves:

- ``sys.path`` starts with the module's own folder (as for any Python script, so a
  sibling ``import helper`` works), then the artifact root, then ``.cp_site`` (the
  requirements the build installed);
- the working directory becomes the artifact root (a data file opens by relative path);
- the module is imported by path as a top-level module with no parent package, so a
  package-relative import (``from . import helper``) fails everywhere, the build first.

Every failure raises ``LoadFailed``, whose ``reason`` is one line naming the cause (and
the model's own exception is its ``__cause__``, with the whole traceback).

Standard library only, Python 3.8 syntax: the exported image runs this very file on
its base image's Python, beside ``image_server.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

SITE_DIR = ".cp_site"  # the installed requirements, inside the artifact
OWN_PREFIX = ".cp_"  # the artifact's files that are modelctl's, not the model's
MODULE_PREFIX = "_cp_model_"  # sys.modules name: no dot, so no parent package
MAX_REASON_CHARS = 500

# A replica's LoadError (workers.model_app) reaches the control plane only inside
# Serve's deployment message, amid a traceback of Serve's internals: its one line
# starts with this marker, so that ``reason_in`` finds it there.
MARK = "[cannot load the model] "


class LoadFailed(Exception):
    """The model cannot be loaded; ``reason`` (the message) is one line naming why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def load(root: str, file_path: str, function_name: str) -> Callable[..., Any]:
    """Imports ``file_path`` (relative to the artifact ``root``) and returns its
    callable ``function_name``; raises LoadFailed."""
    root = os.path.abspath(root)
    module_file = os.path.join(root, file_path)
    if not os.path.isfile(module_file):
        raise LoadFailed(f"{file_path} is not in the artifact {root}")
    prepare(root, os.path.dirname(module_file))
    try:
        module = _import(module_file, file_path)
    except LoadFailed:
        raise
    except (Exception, SystemExit) as e:  # the model's code: sys.exit() at import too
        raise LoadFailed(describe(e, root, file_path)) from e
    fn = getattr(module, function_name, None)
    if fn is None:
        raise LoadFailed(f"function {function_name!r} not found in {file_path}")
    if not callable(fn):
        kind = type(fn).__name__
        raise LoadFailed(f"{function_name!r} in {file_path} is not callable (it is a {kind})")
    return fn  # type: ignore[no-any-return]


def prepare(root: str, folder: str) -> None:
    """Puts the module's ``folder``, the artifact ``root`` and its ``.cp_site`` first
    on sys.path, in that order, and makes ``root`` the working directory."""
    for entry in reversed([folder, root, os.path.join(root, SITE_DIR)]):
        while entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    os.chdir(root)


def module_name(file_path: str) -> str:
    """``serve/model.py`` -> ``_cp_model_serve_model``: one name, no dot in it."""
    return MODULE_PREFIX + re.sub(r"\W", "_", os.path.splitext(file_path)[0])


def _import(module_file: str, file_path: str) -> ModuleType:
    name = module_name(file_path)
    spec = importlib.util.spec_from_file_location(name, module_file)
    if spec is None or spec.loader is None:
        raise LoadFailed(f"cannot import {file_path}: not a Python source file (.py)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import does: dataclasses and pickle look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def describe(exc: BaseException, root: str, file_path: str) -> str:
    """One line: what went wrong while importing ``file_path``, and where in the model."""
    kind = type(exc).__name__
    if isinstance(exc, SyntaxError):  # where the bad code is, maybe in a module it imports
        where = (_own(exc.filename, root) or exc.filename) if exc.filename else file_path
        return _one_line(f"{kind} in {where} line {exc.lineno or 0}: {exc.msg or exc}")
    if isinstance(exc, ModuleNotFoundError):
        # A module that is neither beside the code nor a requirement: requirements.txt
        # (not a line of code) is the fix, so the entry file is named.
        return _one_line(f"ImportError in {file_path}: {exc}")
    where, line = _deepest_own_frame(exc, root)
    if isinstance(exc, ImportError):  # a relative import, a name a module lacks: a line
        at = f" line {line}" if line else ""
        return _one_line(f"ImportError in {where or file_path}{at}: {exc}")
    at = f" ({where} line {line})" if line else ""
    text = str(exc)
    return _one_line(f"{kind} while importing {file_path}{at}" + (f": {text}" if text else ""))


def _own(path: str, root: str) -> str:
    """``path`` relative to the artifact when it is the model's own code; else ""."""
    full = os.path.abspath(path)
    if not full.startswith(root + os.sep):
        return ""
    relative = os.path.relpath(full, root)
    return "" if relative.startswith(OWN_PREFIX) else relative.replace(os.sep, "/")


def _deepest_own_frame(exc: BaseException, root: str) -> tuple[str, int]:
    """The file (relative) and line of the innermost frame in the model's own code."""
    tb, found = exc.__traceback__, ("", 0)
    while tb is not None:
        mine = _own(tb.tb_frame.f_code.co_filename, root)
        if mine:
            found = (mine, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_REASON_CHARS else flat[: MAX_REASON_CHARS - 3] + "..."


def reason_in(message: str) -> str:
    """The reason a replica could not load its model, where ``message`` (Serve's, about a
    deployment) holds a marked line; else ``message`` as it is."""
    at = message.rfind(MARK)
    if at < 0:
        return message
    rest = message[at + len(MARK) :].splitlines()
    return rest[0].strip() if rest else message
