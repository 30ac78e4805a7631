"""Builds of a model (state, function, runtime, cache hit, size), one build (resolved
packages, error, its log live, the OCI export download), and **Deploy New Build**: the
code as a zip or a folder, zipped here, uploaded, built and deployed; its build page
then follows the build's log and the operation's progress live."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import posixpath
import zipfile
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote, urlencode

from markupsafe import escape
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from controlplane.api.client import ClientError
from controlplane.console import forms, kit, live
from controlplane.console.pages.deployments import (
    Serving,
    parse_serving,
    serving_values,
    status_of,
    texts,
)
from controlplane.domain.errors import InvalidArgument
from controlplane.domain.names import check_id
from controlplane.domain.states import BuildState
from controlplane.domain.types import Build, Deployment, DeployOptions, Model, Operation

log = logging.getLogger(__name__)

PAGE_SIZE = 50
MODEL = "/projects/{project}/models/{model}"
LOG_LINES = 2000  # the page shows at most this many of a build's last lines
LOG_ID = "build-log"
LIVE_BLOCKS = ("build_state", "operation_progress")
# What the console itself takes in one Deploy New Build (the server has its own limit,
# 256 MiB by default, and says so in words when the code is over it).
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024
MAX_FILES = 10_000  # files of a folder, as the server takes entries of a zip
MAX_TEXT_FIELD = 8 * 1024 * 1024  # an environment of 200 values of 32 KiB fits
# What a folder upload leaves out, as `modelctl build` does.
SKIP_DIRS = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
    }
)
SKIP_SUFFIXES = (".pyc", ".pyo")
SKIP_FILES = frozenset({".DS_Store", "Thumbs.db"})
FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the same folder zips to the same bytes: cache hits


def size_text(n: int) -> str:
    if n <= 0:
        return "—"
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def build_name(view: kit.View) -> str:
    return f"{view.model}/builds/{view.params['build']}"


# ---- Builds ---------------------------------------------------------------------------------


async def load_list(view: kit.View) -> dict[str, Any]:
    model, page = await kit.model_and_page(view, view.client.list_builds, PAGE_SIZE)
    return {
        "title": f"Builds of {view.model_id}",
        "model": model,
        "model_id": view.model_id,
        "builds": page.items,
        "next_page": page.next_page_token,
        "size": size_text,
    }


# ---- one build ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """The operation the page follows (``?operation=``), and its deployment's replicas."""

    name: str
    operation: Operation | None
    deployment: Deployment | None
    error: str  # the operation could not be read

    @property
    def running(self) -> int:
        return kit.running(self.deployment)

    @property
    def finished(self) -> bool:
        return self.operation is None or self.operation.done


async def progress_of(view: kit.View) -> Progress | None:
    name = view.query("operation").strip()
    if not name:
        return None
    try:
        op = await view.client.get_operation(name)
    except ClientError as e:
        if e.code == "UNAUTHENTICATED":
            raise
        return Progress(name, None, None, kit.describe(e))
    if op.model != view.model:
        return Progress(name, None, None, f"{name} is not an operation of this model")
    dep = None
    if op.deployment:
        with contextlib.suppress(ClientError):
            dep = await view.client.get_deployment(op.deployment)
    return Progress(name, op, dep, "")


async def build_context(view: kit.View) -> dict[str, Any]:
    """What the live blocks show: the build's state and the operation's progress."""
    build, progress = await asyncio.gather(
        view.client.get_build(build_name(view)), progress_of(view)
    )
    return {
        "title": f"Build {build.version} of {view.model_id}",
        "model_id": view.model_id,
        "build": build,
        "progress": progress,
        "size": size_text,
        "overview": view.model_path,
    }


def finished(build: Build) -> bool:
    return build.state in (BuildState.BUILT, BuildState.FAILED)


async def load_build(view: kit.View) -> dict[str, Any]:
    context = await build_context(view)
    lines: deque[str] = deque(maxlen=LOG_LINES)
    total = 0
    async for line in view.client.build_logs(build_name(view)):
        lines.append(line.text)
        total = line.number
    build: Build = context["build"]
    progress: Progress | None = context["progress"]
    context.update(log_lines=list(lines), log_cut=total - len(lines))
    if not finished(build) or (progress is not None and not progress.finished):
        query = {"after": str(total), **({"operation": progress.name} if progress else {})}
        context["live_url"] = f"{view.request.url.path}/log?{urlencode(query)}"
    return context


def lines_html(texts: list[str]) -> str:
    return "".join(f'<span class="log-line">{escape(t)}\n</span>' for t in texts)


def build_events(console: kit.Console) -> Any:
    """The build page's stream: ``append`` events of the log's lines (after ``after``) as
    the build writes them, ``swap`` events of the state and the operation's progress as
    the model changes, and ``done`` once the log has ended and the operation is done."""

    async def events(view: kit.View) -> AsyncIterator[str]:
        after = int(view.query("after")) if view.query("after").isdecimal() else 0
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def read_log() -> None:
            try:
                async for line in view.client.build_logs(build_name(view), follow=True):
                    await queue.put(("line", line))
                await queue.put(("log-end", None))
            except Exception as e:  # handed to the reader
                await queue.put(("error", e))

        async def read_changes() -> None:
            try:
                async for _ in view.client.watch_model(view.model):
                    await queue.put(("change", None))
            except Exception as e:
                await queue.put(("error", e))

        tasks = [asyncio.create_task(read_log()), asyncio.create_task(read_changes())]
        sent: dict[str, str] = {}
        log_ended = False
        try:
            while True:
                batch = [await queue.get()]
                while not queue.empty():
                    batch.append(queue.get_nowait())
                lines = [v.text for k, v in batch if k == "line" and v.number > after]
                if lines:
                    yield live.sse("append", {"id": LOG_ID, "html": lines_html(lines)})
                for kind, value in batch:
                    if kind == "error":
                        raise value
                log_ended = log_ended or any(k == "log-end" for k, _ in batch)
                if not any(k in ("change", "log-end") for k, _ in batch):
                    continue
                context = await build_context(view)
                blocks = console.render_blocks("build.html", view, context, LIVE_BLOCKS)
                for name, html in blocks.items():
                    if sent.get(name) != html:
                        sent[name] = html
                        yield live.sse("swap", {"id": name.replace("_", "-"), "html": html})
                progress: Progress | None = context["progress"]
                if log_ended and (progress is None or progress.finished):
                    yield live.sse("done", {})
                    return
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return events


def export_route(console: kit.Console) -> Any:
    """GET: the build as an OCI image layout (a tar archive), streamed from ExportBuild
    as a download; a refusal goes back to the build page, in words."""

    async def route(request: Request) -> Response:
        try:
            view = await console.view(request)
        except kit.Denied:
            return kit.sign_in_redirect(request)
        name = build_name(view)
        stream = cast(  # an async generator: closed here, which cancels the call
            AsyncGenerator[tuple[bytes, str], None],
            view.client.export_build_stream(
                name, view.query("base").strip(), view.query("tag").strip()
            ),
        )
        try:
            first, _ = await anext(stream)
        except StopAsyncIteration:
            first = b""
        except ClientError as e:
            await stream.aclose()
            if e.code == "UNAUTHENTICATED":
                await console.sessions.end(view.session.id)
                return kit.sign_in_redirect(request)
            view.session.flash("error", f"The OCI export did not work. {kit.describe(e)}")
            return RedirectResponse(f"{view.model_path}/builds/{view.params['build']}", 303)

        async def body() -> AsyncIterator[bytes]:
            try:
                if first:
                    yield first
                async for data, _ in stream:
                    if data:
                        yield data
            except ClientError as e:  # cut off: the browser marks the download failed
                log.warning("OCI export of %s cut off: %s", name, e)
                raise
            finally:
                await stream.aclose()

        filename = f"{view.model_id}-build-{view.params['build']}-oci.tar"
        return StreamingResponse(
            body(),
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    return route


# ---- Deploy New Build -----------------------------------------------------------------------


async def _newest_build(view: kit.View, model: str) -> Build | None:
    page = await view.client.list_builds(model, 1)
    return page.items[0] if page.items else None


async def deploy_context(
    view: kit.View, model_id: str, values: Mapping[str, str] | None = None, error: str = ""
) -> dict[str, Any]:
    """The form, prefilled from ``model_id``'s active deployment and newest build when
    the model exists (resources, environment, file and function), else with defaults."""
    page = await view.client.list_models(view.parent, 1000)
    known = [kit.last(m.name) for m in page.items]
    active: Deployment | None = None
    model: Model | None = None
    if model_id:
        try:
            model = await view.client.get_model(f"{view.parent}/models/{model_id}")
        except ClientError as e:
            if e.code == "UNAUTHENTICATED":
                raise
    if model is not None and model.active_deployment:
        active = await view.client.get_deployment(model.active_deployment)
    if values is None:
        newest = await _newest_build(view, model.name) if model is not None else None
        values = {
            "model_id": model_id,
            "file_path": newest.file_path if newest else "model.py",
            "function_name": newest.function_name if newest else "predict",
            "comment": "",
            "deploy": "yes",
            **serving_values(active),
        }
    return {
        "title": "Deploy New Build",
        "model_id": model_id,
        "model": model,
        "known_models": known,
        "active": active,
        "values": dict(values),
        "error": error,
        "max_upload": size_text(MAX_UPLOAD_BYTES),
    }


async def load_deploy(view: kit.View) -> dict[str, Any]:
    model_id = view.params.get("model", "")
    if model_id:
        await view.client.get_model(view.model)  # a clear NOT_FOUND for a model that is not
    return await deploy_context(view, model_id)


@dataclass(frozen=True)
class NewBuild:
    model_id: str
    data: bytes
    file_path: str
    function_name: str
    comment: str
    serving: Serving | None  # None: build only


def _given(value: object) -> bool:
    return isinstance(value, UploadFile) and bool(value.filename)


async def _read(files: list[UploadFile]) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    total = 0
    for f in files:
        data = await f.read()
        total += len(data)
        if total > MAX_UPLOAD_BYTES:
            raise ValueError(
                f"Too big: the console takes at most {size_text(MAX_UPLOAD_BYTES)} of code"
            )
        out.append((f.filename or "", data))
    return out


def folder_zip(files: list[tuple[str, bytes]]) -> bytes:
    """A folder the browser sent (each file named by its path relative to the chosen
    folder) as a zip of its files, without that top folder, caches left out."""
    entries: list[tuple[list[str], bytes]] = []
    for raw, data in files:
        parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise ValueError(f"“{raw[:80]}” is not a path inside the folder")
        entries.append((parts, data))
    tops = {parts[0] for parts, _ in entries}
    if len(tops) == 1 and all(len(parts) > 1 for parts, _ in entries):
        entries = [(parts[1:], data) for parts, data in entries]
    kept = sorted(
        ("/".join(parts), data)
        for parts, data in entries
        if not any(p in SKIP_DIRS for p in parts[:-1])
        and parts[-1] not in SKIP_FILES
        and not parts[-1].endswith(SKIP_SUFFIXES)
    )
    if not kept:
        raise ValueError("Code: the folder has no files to upload")
    if len(kept) > MAX_FILES:
        raise ValueError(f"Code: the folder has more than {MAX_FILES} files")
    names = [name for name, _ in kept]
    if len(set(names)) != len(names):
        raise ValueError("Code: the folder names a file twice")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in kept:
            info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buf.getvalue()


def zip_files(data: bytes, filename: str) -> list[str]:
    """The files of an uploaded zip, or ValueError when it is not one."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [posixpath.normpath(i.filename) for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError):
        raise ValueError(f"Code: “{filename[:80]}” is not a zip archive") from None


def check_file(file_path: str, files: list[str]) -> str:
    """``file_path`` normalised, once it is a .py file of the code."""
    path = posixpath.normpath(file_path.strip()) if file_path.strip() else ""
    if not path.endswith(".py") or path.startswith(("/", "../")) or path == "..":
        raise ValueError(f"File: “{file_path[:80]}” is not the path of a .py file in the code")
    if path not in files:
        near = sorted(f for f in files if f.endswith("/" + path) or f == path)
        hint = f" (did you mean {near[0]}?)" if near else ""
        listed = ", ".join(sorted(files)[:8]) + (" …" if len(files) > 8 else "")
        raise ValueError(f"File: {path} is not in the code{hint}; its files: {listed}")
    return path


async def read_new_build(form: FormData) -> NewBuild:
    """Everything the form asks for, checked before anything is created."""
    values = texts(form)
    model_id = values.get("model_id", "").strip()
    if not model_id:
        raise ValueError("Model: give the id of an existing model or of a new one")
    try:
        check_id(model_id, "Model")
    except InvalidArgument as e:
        raise ValueError(e.message) from None
    archive = form.get("source_zip")
    folder = [f for f in form.getlist("source_folder") if _given(f)]
    if _given(archive) and folder:
        raise ValueError("Code: choose a zip file or a folder, not both")
    if isinstance(archive, UploadFile) and _given(archive):
        [(filename, data)] = await _read([archive])
        if not data:
            raise ValueError(f"Code: “{filename[:80]}” is empty")
        files = zip_files(data, filename)
    elif folder:
        data = folder_zip(await _read([f for f in folder if isinstance(f, UploadFile)]))
        files = zip_files(data, "the folder")
    else:
        raise ValueError("Code: choose a zip file or a folder with the model's code")
    file_path = check_file(values.get("file_path", "") or "model.py", files)
    function = values.get("function_name", "").strip() or "predict"
    if not function.isidentifier():
        raise ValueError(f"Function: “{function[:80]}” is not a Python function name")
    serving = parse_serving(values) if values.get("deploy") else None
    return NewBuild(model_id, data, file_path, function, values.get("comment", ""), serving)


def _refusal(e: ClientError) -> str:
    if e.reason == "SOURCE_TOO_LARGE":
        limit = int(e.metadata.get("limit_bytes", "0") or 0)
        return f"Too big: this server takes at most {size_text(limit)} of zipped code."
    return kit.describe(e)


class Refused(Exception):
    """The API refused a step of Deploy New Build: its reason in words."""

    def __init__(self, words: str, status: int) -> None:
        super().__init__(words)
        self.words = words
        self.status = status


async def start_build(view: kit.View, new: NewBuild) -> Operation:
    """Creates the model when it is new, uploads the code and starts the build (and the
    deploy after it); a model created here is removed again when a later step fails
    (where the caller may delete models). Raises Refused, or ClientError when signed out."""
    name = f"{view.parent}/models/{new.model_id}"
    created = False
    try:
        try:
            await view.client.get_model(name)
        except ClientError as e:
            if e.code != "NOT_FOUND":
                raise
            await view.client.create_model(view.parent, new.model_id)
            created = True
        source = await view.client.upload_source(name, new.data)
        deploy = None
        if new.serving is not None:
            deploy = DeployOptions(
                resources=new.serving.resources,
                environment=new.serving.environment,
                secret_environment=new.serving.secrets,
            )
        return await view.client.create_build(
            name, source.sha256, new.file_path, new.function_name, new.comment, deploy
        )
    except ClientError as e:
        if e.code == "UNAUTHENTICATED":
            raise
        words = _refusal(e)
        if created:
            try:
                await view.client.delete_model(name)
            except ClientError:
                words += f" (model {new.model_id} was created; it has no build yet)"
        raise Refused(words, status_of(e)) from None


def deploy_route(console: kit.Console) -> Any:
    """POST (multipart) Deploy New Build: on success, to the build's page following the
    operation; otherwise the form again with what was typed and the reason in words."""

    async def route(request: Request) -> Response:
        try:
            view = await console.view(request)
        except kit.Denied:
            return kit.sign_in_redirect(request)
        error, status, values = "", 400, {}
        form: FormData | None = None
        size = request.headers.get("content-length", "")
        if size.isdecimal() and int(size) > MAX_UPLOAD_BYTES + MAX_TEXT_FIELD:
            error = f"Too big: the console takes at most {size_text(MAX_UPLOAD_BYTES)} of code"
        else:
            try:  # read once with room for a folder's files; the CSRF check reuses it
                form = await request.form(
                    max_files=MAX_FILES + 1, max_fields=100, max_part_size=MAX_TEXT_FIELD
                )
            except HTTPException as e:
                error = f"The upload could not be read: {e.detail}"
        try:
            if form is not None:
                checked = await forms.checked_form(console, request)
                if isinstance(checked, Response):
                    return checked
                values = texts(form)
                try:
                    new = await read_new_build(form)
                    op = await start_build(view, new)
                except ValueError as e:
                    error = f"Not valid: {e}"
                except Refused as e:
                    error, status = e.words, e.status
                except ClientError:  # start_build lets only UNAUTHENTICATED through
                    await console.sessions.end(view.session.id)
                    return kit.sign_in_redirect(request)
                else:
                    view.session.flash(
                        "ok",
                        f"Building {new.model_id} build {kit.last(op.target)}"
                        + (" and deploying it" if new.serving else "")
                        + f": operation {op.name}",
                    )
                    target = f"/projects/{view.project}/models/{new.model_id}/builds/"
                    return RedirectResponse(
                        f"{target}{kit.last(op.target)}?operation={quote(op.name, safe='/')}",
                        303,
                    )
        finally:
            if form is not None:
                await form.close()
        shown = {**values, "secret_environment": ""}  # secret values never go back out
        try:
            context = await deploy_context(view, values.get("model_id", "").strip(), shown, error)
        except ClientError as e:
            return console.error_page(view, e)
        return console.page_response("deploy.html", view, context, status)

    return route


def routes(console: kit.Console) -> list[BaseRoute]:
    builds = MODEL + "/builds"
    return [
        *live.page(
            console,
            builds,
            "builds.html",
            load_list,
            watch=kit.model_changes,
            live=("builds_table",),
        ),
        *live.page(console, builds + "/{build}", "build.html", load_build),
        Route(builds + "/{build}/log", live.stream_route(console, build_events(console))),
        Route(builds + "/{build}/export", export_route(console), methods=["GET"]),
        *live.page(console, "/projects/{project}/deploy", "deploy.html", load_deploy),
        *live.page(console, MODEL + "/deploy", "deploy.html", load_deploy),
        Route("/projects/{project}/deploy", deploy_route(console), methods=["POST"]),
    ]
