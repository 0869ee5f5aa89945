"""The one DICOMweb client of the app: STOW-RS, QIDO-RS and WADO-RS over ``requests``.

Authentication (HTTP Basic or bearer token), TLS verification (system store or a custom CA
bundle), connect and read timeouts, and retries with exponential backoff and jitter
(tenacity) for the failures a resend can cure: unreachable server, timeouts, HTTP 5xx/429.

STOW-RS bodies are sent with a Content-Length (never chunked: some servers store nothing
and still answer 200), and the answer is read item by item: an instance counts as stored
only when it is listed in ReferencedSOPSequence. Whatever the status code, instances in
FailedSOPSequence, or missing from the answer, come back as failed so the caller resends
exactly those.

Error messages name the server URL and the HTTP status, never credentials.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from app.domain import AppError
from app.settings import ServerSettings

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"
REFERENCED_SOP_INSTANCE_UID, FAILURE_REASON = "00081155", "00081197"
SOP_INSTANCE_UID_TAG = "00080018"
QIDO_PAGE = 1000


class DicomWebError(AppError):
    """A DICOMweb request failed. ``retryable``: a later resend may succeed."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class ServerUnavailable(DicomWebError):
    """Unreachable, timed out, or answered 5xx/429: try again later."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message, status, retryable=True)


class AuthenticationFailed(DicomWebError):
    """401/403: the credentials are wrong or lack permission; resending will not help."""


class RequestRejected(DicomWebError):
    """The server refused the request itself (4xx other than auth)."""


@dataclass(frozen=True)
class StowOutcome:
    """What the server said about each instance of one STOW-RS request."""

    status: int
    stored: frozenset[str]
    failed: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> reason


def _failure_reason(item: dict) -> str:
    code = (item.get(FAILURE_REASON, {}).get("Value") or [None])[0]
    return f"server refused it (failure reason 0x{int(code):04X})" if code is not None else "server refused it"


def parse_stow_response(status: int, body: dict | None, sent: Sequence[str]) -> StowOutcome:
    """Sort the sent SOP Instance UIDs into stored / failed according to a STOW-RS answer."""
    body = body or {}
    referenced = {
        uid for item in body.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", []) or []
        for uid in (item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value") or [])
    }
    failed = {}
    for item in body.get(FAILED_SOP_SEQUENCE, {}).get("Value", []) or []:
        for uid in item.get(REFERENCED_SOP_INSTANCE_UID, {}).get("Value") or []:
            failed[uid] = _failure_reason(item)
    if status == 200 and not body:
        referenced = set(sent)  # a bare 200 means "all stored"; the QIDO check confirms it later
    stored = frozenset(uid for uid in sent if uid in referenced and uid not in failed)
    for uid in sent:
        if uid not in stored and uid not in failed:
            failed[uid] = "server did not acknowledge it"
    return StowOutcome(status=status, stored=stored, failed=failed)


def _multipart(parts: Sequence[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The payloads of a multipart/related body (WADO-RS answers)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestRejected("server answered WADO-RS with a body that is not multipart")
    return [part.get_payload(decode=True) for part in message.iter_parts()]


class DicomWebClient:
    """Talks to one DICOMweb server. Thread-compatible (one ``requests.Session``)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings.require_url()
        self.base_url = settings.url
        self._session = requests.Session()
        # Only the settings decide: no .netrc, CA bundle or proxy picked up from the environment.
        self._session.trust_env = False
        if settings.proxy:
            self._session.proxies = {"http": settings.proxy, "https": settings.proxy}
        if settings.token:
            self._session.headers["Authorization"] = f"Bearer {settings.token}"
        elif settings.user:
            self._session.auth = (settings.user, settings.password)
        self._session.verify = settings.ca_bundle or True
        self._timeout = (settings.connect_timeout_s, settings.read_timeout_s)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport -------------------------------------------------------------------
    def _request_once(self, method: str, path: str, **kwargs) -> requests.Response:
        url = f"{self.base_url}{path}"
        try:
            response = self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.exceptions.SSLError:
            raise DicomWebError(f"TLS verification of {self.base_url} failed: the certificate is not trusted "
                                "(set ca_bundle / TELERAD_CA_BUNDLE to the CA that signed it)") from None
        except requests.exceptions.ConnectTimeout:
            raise ServerUnavailable(f"server {self.base_url} did not accept a connection within "
                                    f"{self.settings.connect_timeout_s:g} s") from None
        except requests.exceptions.ReadTimeout:
            raise ServerUnavailable(f"server {self.base_url} did not answer within "
                                    f"{self.settings.read_timeout_s:g} s (read timeout)") from None
        except requests.exceptions.ConnectionError:
            raise ServerUnavailable(f"server {self.base_url} is unreachable (connection refused or lost)") from None
        except requests.exceptions.RequestException as exc:
            raise ServerUnavailable(f"request to {self.base_url} failed ({type(exc).__name__})") from None
        status = response.status_code
        if status in (401, 403):
            raise AuthenticationFailed(f"server {self.base_url} refused the credentials (HTTP {status}); "
                                       "check the user and password (TELERAD_USER / TELERAD_PASSWORD) "
                                       "or the token", status)
        if status == 429 or status >= 500:
            raise ServerUnavailable(f"server {self.base_url} answered HTTP {status} "
                                    f"({response.reason or 'error'})", status)
        return response

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        def log_retry(state) -> None:
            log.warning("%s; retrying (attempt %d of %d)", state.outcome.exception(),
                        state.attempt_number + 1, self.settings.retry_attempts)

        retrying = Retrying(
            stop=stop_after_attempt(max(1, self.settings.retry_attempts)),
            wait=wait_random_exponential(multiplier=self.settings.backoff_initial_s,
                                         max=self.settings.backoff_max_s),
            retry=retry_if_exception(lambda exc: isinstance(exc, DicomWebError) and exc.retryable),
            before_sleep=log_retry, reraise=True)
        return retrying(self._request_once, method, path, **kwargs)

    # --- STOW-RS --------------------------------------------------------------------
    def store(self, instances: Sequence[tuple[str, bytes]]) -> StowOutcome:
        """Store (SOPInstanceUID, Part 10 file bytes) pairs in one STOW-RS request."""
        uids = [uid for uid, _ in instances]
        body, content_type = _multipart([data for _, data in instances])
        response = self._request("POST", "/studies", data=body,
                                 headers={"Content-Type": content_type, "Accept": DICOM_JSON})
        if response.status_code not in (200, 202, 400, 409):
            raise RequestRejected(f"server {self.base_url} rejected the upload (HTTP {response.status_code}"
                                  + (": request too large; lower batch_size" if response.status_code == 413 else "")
                                  + ")", response.status_code)
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # e.g. a proxy's HTML page: only the QIDO check can tell what was stored
            answer = None
        if response.status_code in (400, 409) and answer is None:
            raise RequestRejected(f"server {self.base_url} rejected the upload (HTTP {response.status_code})",
                                  response.status_code)
        outcome = parse_stow_response(response.status_code, answer, uids)
        log.info("STOW-RS %d instance(s): HTTP %d, %d stored, %d failed", len(uids), response.status_code,
                 len(outcome.stored), len(outcome.failed))
        return outcome

    # --- QIDO-RS --------------------------------------------------------------------
    def _search(self, path: str, params: dict) -> list[dict]:
        """All results of a QIDO-RS query, page by page.

        Another page is asked for when this one was full or the server said it cut the results
        short (PS3.18 "Warning: 299"); a server that ignores ``offset`` and repeats its page ends the loop.
        """
        results: list[dict] = []
        previous: list | None = None
        while True:
            response = self._request("GET", path, params={**params, "limit": QIDO_PAGE, "offset": len(results)},
                                     headers={"Accept": DICOM_JSON})
            if response.status_code in (204, 404):
                break
            if response.status_code != 200:
                raise RequestRejected(f"server {self.base_url} refused the query (HTTP {response.status_code})",
                                      response.status_code)
            try:
                page = response.json() if response.content else []
            except ValueError:
                page = None
            if not isinstance(page, list):
                # Typically a proxy or captive portal answering in its place: worth trying again later.
                raise ServerUnavailable(f"server {self.base_url} answered the query with something that is not "
                                        f"DICOM JSON ({response.headers.get('Content-Type') or 'no content type'})")
            if not page or page == previous:
                break
            results += page
            previous = page
            truncated = "299" in response.headers.get("Warning", "")
            if len(page) < QIDO_PAGE and not truncated:
                break
        return results

    def search_studies(self, **filters: str) -> list[dict]:
        """QIDO-RS studies (DICOM JSON), e.g. ``search_studies(PatientID="X")``."""
        return self._search("/studies", filters)

    def search_instances(self, study_instance_uid: str, **filters: str) -> list[dict]:
        return self._search(f"/studies/{study_instance_uid}/instances", filters)

    def search_all_instances(self, **filters: str) -> list[dict]:
        """QIDO-RS instances of every study, e.g. ``search_all_instances(Modality="SR")``."""
        return self._search("/instances", filters)

    def study_instance_uids(self, study_instance_uid: str) -> set[str]:
        """SOP Instance UIDs the server holds for the study (the delivery check)."""
        found = self.search_instances(study_instance_uid, includefield=SOP_INSTANCE_UID_TAG)
        return {uid for item in found for uid in item.get(SOP_INSTANCE_UID_TAG, {}).get("Value", [])}

    # --- WADO-RS --------------------------------------------------------------------
    def retrieve_instance(self, study_instance_uid: str, series_instance_uid: str,
                          sop_instance_uid: str) -> pydicom.Dataset:
        path = f"/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"
        response = self._request("GET", path, headers={"Accept": 'multipart/related; type="application/dicom"'})
        if response.status_code != 200:
            raise RequestRejected(f"server {self.base_url} could not return the instance "
                                  f"(HTTP {response.status_code})", response.status_code)
        parts = split_multipart(response.content, response.headers.get("Content-Type", ""))
        if len(parts) != 1:
            raise RequestRejected(f"server {self.base_url} returned {len(parts)} parts for one instance")
        try:
            return pydicom.dcmread(DicomBytesIO(parts[0]))
        except (InvalidDicomError, EOFError, ValueError) as exc:
            raise RequestRejected(f"server {self.base_url} returned an instance that is not valid DICOM ({exc})") from exc
