"""Model folders that every loader must treat alike (``workers.loader``): the build's
import check, a replica, the exported image's server. Each case is a source folder and
what calling its ``predict(BODY)`` returns, or the one-line reason it cannot load."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.oci import SERVE_FILE, server_files

BODY = 1  # the request body every case is called with
FUNCTION = "predict"
TINYPKG = {
    "tinypkg/__init__.py": (
        "import os\n\n"
        "def double(x):\n"
        "    return x * 2\n\n"
        "INSTALLED = os.path.basename(os.path.dirname(os.path.dirname(__file__)))\n"
    )
}


@dataclass(frozen=True)
class Case:
    name: str
    files: dict[str, str]  # the model's source folder
    response: Any = None  # what predict(BODY) returns
    error: str = ""  # or: the one line every loader fails with
    site: dict[str, str] = field(default_factory=dict)  # requirements, as installed
    file_path: str = "serve/model.py"


SIBLING = Case(
    "sibling import",
    {
        "serve/model.py": "import helper\n\ndef predict(body):\n    return [helper.NAME, body]\n",
        "serve/helper.py": "NAME = 'beside the model'\n",
    },
    response=["beside the model", BODY],
)
RELATIVE = Case(
    "package-relative import",
    {
        "serve/model.py": "from . import helper\n\ndef predict(body):\n    return helper.NAME\n",
        "serve/helper.py": "NAME = 'beside the model'\n",
    },
    error=(
        "ImportError in serve/model.py line 1: "
        "attempted relative import with no known parent package"
    ),
)
DATA_FILE = Case(
    "data file by relative path",
    {
        "serve/model.py": (
            "with open('data/labels.txt') as f:  # relative to the artifact's root\n"
            "    LABELS = f.read().split()\n\n"
            "def predict(body):\n"
            "    return LABELS[body]\n"
        ),
        "data/labels.txt": "setosa versicolor virginica\n",
    },
    response="versicolor",
)
REQUIREMENT = Case(
    "package from requirements.txt",
    {
        "serve/model.py": (
            "import tinypkg\n\n"
            "def predict(body):\n"
            "    return [tinypkg.double(body), tinypkg.INSTALLED]\n"
        ),
    },
    site=TINYPKG,
    response=[2 * BODY, ".cp_site"],
)
MISSING_MODULE = Case(
    "module neither beside nor installed",
    {"serve/model.py": "import cp_not_installed_anywhere\n\ndef predict(body):\n    return 1\n"},
    error="ImportError in serve/model.py: No module named 'cp_not_installed_anywhere'",
)
CASES = [SIBLING, RELATIVE, DATA_FILE, REQUIREMENT, MISSING_MODULE]


def write_artifact(root: Path, case: Case) -> Path:
    """The folder a build leaves: the source, its requirements installed in .cp_site."""
    for name, text in case.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name, text in case.site.items():
        path = root / ".cp_site" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def write_image_server(folder: Path) -> Path:
    """The exported image's own files (server and loader) in ``folder``; returns the
    server's path, to run as the image does."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in server_files().items():
        (folder / name).write_text(text)
    return folder / SERVE_FILE


def source_files(case: Case) -> dict[str, bytes]:
    """The source folder to upload: a case's requirements come as a local wheel named in
    requirements.txt, which pip installs into .cp_site without any package index."""
    files = {name: text.encode() for name, text in case.files.items()}
    if case.site:
        name = "tinypkg-1.0-py3-none-any.whl"
        files[f"wheels/{name}"] = wheel("tinypkg", "1.0", case.site)
        files["requirements.txt"] = f"--no-index\n./wheels/{name}\n".encode()
    return files


def zip_source(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def wheel(name: str, version: str, files: dict[str, str]) -> bytes:
    """A minimal pure-Python wheel holding ``files``."""
    dist_info = f"{name}-{version}.dist-info"
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    )
    contents[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    return zip_source(contents)
