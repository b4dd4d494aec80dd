"""A throwaway Orthanc PACS on free loopback ports, for tests, ``make demo`` and ``make bench``.

It runs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` with the settings measured in ORTHANC.md:
the DICOMweb plugin, HTTP compression off, ``TCP_NODELAY=1``, storage in a temporary folder, and DICOM modalities
for C-MOVE destinations. Orthanc 1.10 cannot bind to one address; we only ever talk to it on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from testbed.cohort import GeneratedCohort
from testbed.processes import stop

PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/plugins/libOrthancDicomWeb.so",
)
INSTALL_HINT = "install it with: apt-get install -y orthanc orthanc-dicomweb"
HOST = "127.0.0.1"


class OrthancUnavailable(RuntimeError):
    """Orthanc or its DICOMweb plugin is not installed, or it would not start."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def find_orthanc() -> tuple[str, str]:
    """Paths of the Orthanc binary and the DICOMweb plugin, or :class:`OrthancUnavailable` saying how to install."""
    override = os.environ.get("TROLLEY_ORTHANC_BINARY")  # another build of Orthanc, or none (to test its absence)
    if override:
        if not os.access(override, os.X_OK):
            raise OrthancUnavailable(f"TROLLEY_ORTHANC_BINARY={override} is not an executable; {INSTALL_HINT}")
        binary: str | None = override
    else:
        binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if binary is None:
        raise OrthancUnavailable(f"Orthanc is not installed; {INSTALL_HINT}")
    plugin = next((p for p in PLUGIN_PATHS if os.path.exists(p)), None)
    if plugin is None:
        raise OrthancUnavailable(f"the Orthanc DICOMweb plugin is not installed; {INSTALL_HINT}")
    return binary, plugin


class OrthancServer:
    """One Orthanc process with its own storage, ports and configuration.

    Parameters
    ----------
    workdir
        Folder for the configuration, the database and the log. Removed by nobody: the caller owns it.
    modalities
        C-MOVE destinations, ``{"TROLLEY": ("TROLLEY", port)}`` on 127.0.0.1 (:meth:`set_modality` can name
        another host while Orthanc runs).
    users
        HTTP basic-auth users ``{"name": "password"}``; when given, authentication is enabled.
    extra_config
        Any other Orthanc settings (for example ``{"LimitFindResults": 5}``).
    """

    aet = "ORTHANC"

    def __init__(
        self,
        workdir: Path,
        *,
        modalities: Mapping[str, tuple[str, int]] | None = None,
        users: Mapping[str, str] | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities = dict(modalities or {})
        self.users = dict(users or {})
        self.extra_config = dict(extra_config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        if self.users:
            name, password = next(iter(self.users.items()))
            self.session.auth = (name, password)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def wado_url(self) -> str:
        return f"{self.url}/wado"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def config(self, plugin: str) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": "trolley-test-pacs",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "HttpCompressionEnabled": False,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomModalities": {name: [aet, HOST, port] for name, (aet, port) in self.modalities.items()},
            "StableAge": 1,
            "HttpThreadsCount": 16,
        }
        config.update(self.extra_config)
        return config

    def start(self, timeout: float = 60.0) -> OrthancServer:
        binary, plugin = find_orthanc()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config(plugin), indent=2))
        env = dict(os.environ, TCP_NODELAY="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise OrthancUnavailable(f"Orthanc exited with {self.process.returncode}; see {self.log_path}")
            try:
                if self.session.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise OrthancUnavailable(f"Orthanc did not answer /system within {timeout:g}s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, timeout=20)
        self.process = None
        self.session.close()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def upload(self, files: Iterable[bytes], threads: int = 4) -> int:
        """POST each DICOM file to /instances; return how many Orthanc stored."""

        def post(body: bytes) -> None:
            response = self.session.post(
                f"{self.url}/instances",
                data=body,
                headers={"Content-Type": "application/dicom", "Expect": ""},
                timeout=60,
            )
            response.raise_for_status()

        count = 0
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(post, files):
                count += 1
        return count

    def load_cohort(self, cohort: GeneratedCohort, threads: int = 4) -> int:
        """Generate and upload every instance of ``cohort``."""
        return self.upload((cohort.encode(item) for item in cohort), threads=threads)

    def set_modality(self, name: str, aet: str, port: int, host: str = HOST) -> None:
        """Add or change a C-MOVE destination while Orthanc runs (PUT /modalities/{name}); ``host`` is where Orthanc
        connects to send (another address than 127.0.0.1 only for the namespace hosts' test, on its own bridge)."""
        response = self.session.put(
            f"{self.url}/modalities/{name}", json={"AET": aet, "Host": host, "Port": port}, timeout=10
        )
        response.raise_for_status()
        self.modalities[name] = (aet, port)

    def delete_modality(self, name: str) -> None:
        """Remove a C-MOVE destination (DELETE /modalities/{name}); one that is not there is not an error."""
        response = self.session.delete(f"{self.url}/modalities/{name}", timeout=10)
        if response.status_code != 404:
            response.raise_for_status()
        self.modalities.pop(name, None)

    def modality_names(self) -> list[str]:
        """The C-MOVE destinations Orthanc knows now (GET /modalities)."""
        names: list[str] = self.session.get(f"{self.url}/modalities", timeout=10).json()
        return names

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove one instance from the PACS (tests of not-found and retry-failed)."""
        found = self.session.post(f"{self.url}/tools/lookup", data=sop_instance_uid, timeout=10).json()
        for hit in found:
            if hit["Type"] == "Instance":
                self.session.delete(f"{self.url}{hit['Path']}", timeout=10).raise_for_status()

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.session.get(f"{self.url}/statistics", timeout=10).json()
        return result
