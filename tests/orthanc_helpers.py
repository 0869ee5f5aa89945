"""A real Orthanc (with the DICOMweb plugin) for integration tests, plus a fault-injecting proxy.

``orthanc_factory`` is a pytest fixture factory: ``orthanc_factory(lua=...)`` starts an
Orthanc on a free loopback port with a temporary storage directory and HTTP Basic
authentication; every server it started is stopped at the end of the test.
``FaultProxy`` sits between client and server on loopback and answers 500, stalls
or slows requests on demand (the faults a clinic's uplink produces).

Missing Orthanc is a test FAILURE with a clear message, never a skip: CI must run these.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests

ORTHANC_BINARY = "Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "clinic", "s3cret-Telerad-pw"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    """Path of the Orthanc binary; fails the test (not skip) when Orthanc is not installed."""
    binary = shutil.which(ORTHANC_BINARY) or shutil.which(ORTHANC_BINARY, path="/usr/sbin:/usr/local/sbin")
    if binary is None or not DICOMWEB_PLUGIN.is_file():
        pytest.fail("Orthanc with the DICOMweb plugin is required for these tests: install the Debian packages "
                    "'orthanc' and 'orthanc-dicomweb' (make debs); missing: "
                    + ("Orthanc binary" if binary is None else str(DICOMWEB_PLUGIN)), pytrace=False)
    return binary


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: Path  # the CA a client must trust
    server_pem: Path  # certificate for IP 127.0.0.1 (signed by the CA) followed by its private key


def make_tls_files(folder: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl command line)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the TLS test needs the openssl command (Debian package openssl)", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=Test teleradiology CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={LOOPBACK}")
    (folder / "san.ext").write_text(f"subjectAltName=IP:{LOOPBACK}\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    server_pem = folder / "server.pem"
    server_pem.write_bytes((folder / "server.crt").read_bytes() + (folder / "server.key").read_bytes())
    return TlsFiles(ca_pem=folder / "ca.pem", server_pem=server_pem)


@dataclass
class OrthancServer:
    """One Orthanc process with its own storage; ``stop`` and ``start`` keep the data and the port."""

    workdir: Path
    http_port: int = field(default_factory=free_port)
    lua: str | None = None
    user: str = USER
    password: str = PASSWORD
    extra_users: dict[str, str] = field(default_factory=dict, repr=False)  # e.g. the teleradiologist
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (self.user, self.password)

    def _write_config(self) -> Path:
        config = {
            "Name": "TeleRad", "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port, "DicomPort": free_port(), "DicomServerEnabled": False,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password, **self.extra_users},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "ConcurrentJobs": 1, "HttpThreadsCount": 8, "StableAge": 1,
            "LuaScripts": [],
        }
        if self.lua:
            script = self.workdir / "filter.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        binary = orthanc_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"Orthanc exited with code {self.process.returncode}; log:\n{self.log_tail()}",
                            pytrace=False)
            try:
                if requests.get(f"{self.base_url}/system", auth=self.auth, timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"Orthanc did not answer on port {self.http_port} within {timeout_s} s; log:\n{self.log_tail()}",
                    pytrace=False)

    def stop(self, kill: bool = False) -> None:
        """Terminate (or kill: no need to shut down cleanly at the end of a test)."""
        if self.process is not None and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, n: int = 40) -> str:
        path = self.workdir / "orthanc.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    # --- what the server holds (Orthanc's own REST API, not the code under test) ----------
    def rest(self, path: str) -> object:
        response = requests.get(f"{self.base_url}{path}", auth=self.auth, timeout=10)
        response.raise_for_status()
        return response.json()

    def instance_ids(self) -> list[str]:
        return list(self.rest("/instances"))

    def sop_instance_uids(self) -> list[str]:
        """Every stored SOPInstanceUID, one entry per stored instance (duplicates would show)."""
        return [self.rest(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in self.instance_ids()]

    def datasets(self) -> list[pydicom.Dataset]:
        out = []
        for i in self.instance_ids():
            response = requests.get(f"{self.base_url}/instances/{i}/file", auth=self.auth, timeout=10)
            response.raise_for_status()
            out.append(pydicom.dcmread(pydicom.filebase.DicomBytesIO(response.content)))
        return out


@pytest.fixture
def orthanc_factory(tmp_path_factory) -> Iterator[Callable[..., OrthancServer]]:
    """Factory fixture: ``orthanc_factory(lua=None, start=True, extra_users=None) -> OrthancServer``."""
    servers: list[OrthancServer] = []

    def make(lua: str | None = None, start: bool = True, extra_users: dict[str, str] | None = None) -> OrthancServer:
        server = OrthancServer(workdir=tmp_path_factory.mktemp("orthanc"), lua=lua, extra_users=extra_users or {})
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop(kill=True)


# Two ways a real Orthanc 1.10 + DICOMweb 1.7 loses instances while answering STOW-RS with 200;
# each hits the instances whose InstanceNumber is a multiple of 3, on their first arrival only.
# DROP: the filter discards the instance, yet it is listed in ReferencedSOPSequence as stored:
# only the QIDO-RS check after the upload can notice.
LUA_DROP_ONCE = """
seen = {}
function ReceivedInstanceFilter(dicom, origin, info)
  local uid = dicom.SOPInstanceUID
  if (tonumber(dicom.InstanceNumber) or 0) % 3 == 0 and not seen[uid] then
    seen[uid] = true
    return false
  end
  return true
end
"""
# FAIL: the filter raises; the plugin stops processing the request and leaves that instance and
# the rest of the request out of the answer (neither stored nor failed): they must be resent.
LUA_FAIL_ONCE = LUA_DROP_ONCE.replace("return false", 'error("test filter: instance refused once")')


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """Payloads of a multipart/related body (independent of the code under test)."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


def _sop_uid(part: bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(part), stop_before_pixels=True)
    return ds.SOPClassUID, ds.SOPInstanceUID


# --- fault-injecting loopback proxy ----------------------------------------------------------
Action = str  # "pass" | "error500" | "stall" | "slow" | "partial"


class FaultProxy:
    """HTTP proxy on loopback in front of ``upstream_port``.

    ``plan(method, path, n)`` picks the action for the n-th request (0-based):
    ``pass`` forwards it; ``error500`` answers 500 without forwarding; ``stall`` forwards
    it (the server stores the data) but holds the response for ``stall_s`` so the client
    times out; ``slow`` forwards it and answers after ``slow_s``; ``partial`` (STOW-RS only)
    withholds the instances ``refuse(sop_uid)`` picks, forwards the rest and answers 202 with
    the withheld ones in FailedSOPSequence, as a server that failed to store some would.
    ``uploaded`` lists the SOP Instance UID of every instance the client POSTed.
    With ``tls`` the proxy speaks HTTPS to the client (Debian's Orthanc 1.10 crashes on HTTPS
    connections, so TLS is terminated here, in front of it).
    """

    def __init__(self, upstream_port: int, plan: Callable[[str, str, int], Action],
                 stall_s: float = 30.0, slow_s: float = 1.0, refuse: Callable[[str], bool] | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.upstream_port = upstream_port
        self.plan = plan
        self.stall_s = stall_s
        self.slow_s = slow_s
        self.refuse = refuse or (lambda uid: False)
        self.requests: list[tuple[str, str, Action, int]] = []  # method, path, action, status
        self.uploaded: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    n = len(proxy.requests)
                    action = proxy.plan(self.command, self.path, n)
                    proxy.requests.append((self.command, self.path, action, 0))
                parts = (multipart_parts(body, self.headers["Content-Type"])
                         if self.command == "POST" and "multipart" in self.headers.get("Content-Type", "") else [])
                with proxy._lock:
                    proxy.uploaded += [_sop_uid(p)[1] for p in parts]
                if action == "error500":
                    self._reply(n, action, 500, [("Content-Type", "text/plain")], b"injected failure")
                    return
                if action == "partial":
                    self._partial(n, parts)
                    return
                status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                if action == "stall":
                    proxy._stop.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                if action == "slow":
                    proxy._stop.wait(proxy.slow_s)
                self._reply(n, action, status, headers, payload)

            def _reply(self, n: int, action: Action, status: int, headers, payload: bytes) -> None:
                with proxy._lock:
                    proxy.requests[n] = (*proxy.requests[n][:2], action, status)
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in ("content-length", "connection", "transfer-encoding", "keep-alive"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            def _partial(self, n: int, parts: list[bytes]) -> None:
                refused = [p for p in parts if proxy.refuse(_sop_uid(p)[1])]
                kept = [p for p in parts if p not in refused]
                answer: dict = {}
                if kept:
                    boundary = "proxy-partial-boundary"
                    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                                    + p + b"\r\n" for p in kept) + b"--" + boundary.encode() + b"--\r\n"
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in ("content-length", "accept-encoding")}  # JSON to edit, not gzip
                    headers["Content-Type"] = f'multipart/related; type="application/dicom"; boundary={boundary}'
                    status, _, payload = proxy._forward("POST", self.path, headers, body)
                    if status != 200:
                        self._reply(n, "partial", status, [], payload)
                        return
                    answer = json.loads(payload)
                failed = []
                for part in refused:
                    sop_class, sop_uid = _sop_uid(part)
                    failed.append({"00081150": {"vr": "UI", "Value": [sop_class]},
                                   "00081155": {"vr": "UI", "Value": [sop_uid]},
                                   "00081197": {"vr": "US", "Value": [0xA700]}})  # out of resources
                answer["00081198"] = {"vr": "SQ", "Value": failed}
                status = 409 if not kept else 202 if failed else 200
                self._reply(n, "partial", status, [("Content-Type", "application/dicom+json")],
                            json.dumps(answer).encode())

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.server_pem)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(LOOPBACK, self.upstream_port, timeout=60)
        try:
            forwarded = {k: v for k, v in headers.items()
                         if k.lower() not in ("host", "connection", "content-length")}
            conn.request(method, path, body=body, headers=forwarded)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    @property
    def dicomweb_url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}/dicom-web"

    def count(self, method: str = "POST", action: Action | None = None) -> int:
        with self._lock:
            return sum(1 for m, _, a, _ in self.requests if m == method and (action is None or a == action))

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
