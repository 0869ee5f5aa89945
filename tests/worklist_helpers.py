"""Helpers for the worklist / read-back tests and the screenshot script.

- ``patient_series``: a small CT series (tests/forward_helpers.py) for a patient of one's choice;
- ``Telerad``: one Orthanc with a clinic user and a reader user, the clinic's app data folder
  and the environment both roles read (``telerad_env``);
- ``forward``: what the clinic's "Forward for review" does (enqueue + deliver), returning the
  study UID as the server knows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pydicom
from forward_helpers import make_study_result, write_ct_series

from app.dicomweb import DicomWebClient
from app.domain import Series, StudyResult
from app.forward import deliver_pending, enqueue_case, open_outbox, open_pseudonyms
from app.settings import ServerSettings, resolve_settings

TELERAD_APP = Path(__file__).resolve().parent / "telerad_app.py"
READER_USER, READER_PASSWORD = "reader", "r3ader-Telerad-pw"
RADIOLOGIST, ORGANIZATION = "Curie^Marie", "TeleRad Reading Group"
CLINIC_SITE = "Clinic North"
FAST = {"connect_timeout_s": 2.0, "read_timeout_s": 10.0, "retry_attempts": 2, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2}
ENV_KEYS = ("TELERAD_URL", "TELERAD_USER", "TELERAD_PASSWORD", "TELERAD_TOKEN", "TELERAD_CA_BUNDLE",
            "TELERAD_READER_URL", "TELERAD_READER_USER", "TELERAD_READER_PASSWORD", "TELERAD_READER_TOKEN",
            "TELERAD_READER_CA_BUNDLE", "TELERAD_READER_NAME", "TELERAD_READER_ORGANIZATION")


def patient_series(folder: Path, patient_id: str, patient_name: str, seed: int, n_slices: int = 10) -> Series:
    """A CT series (64 x 64) of ``patient_id``; every file carries that identity."""
    series = write_ct_series(folder, n_slices=n_slices, size=64, seed=seed)
    for path in series.files:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.save_as(path, enforce_file_format=True)
    return replace(series, patient_id=patient_id, patient_name=patient_name)


@dataclass
class Telerad:
    server: object  # tests.orthanc_helpers.OrthancServer
    clinic_data: Path

    @property
    def url(self) -> str:
        return self.server.dicomweb_url

    def env(self) -> dict[str, str]:
        """Both roles' environment: the clinic's server credentials, the reader's own, the reader's name."""
        return {"MYELOMA_APP_DATA": str(self.clinic_data),
                "TELERAD_URL": self.url, "TELERAD_USER": self.server.user, "TELERAD_PASSWORD": self.server.password,
                "TELERAD_READER_URL": self.url, "TELERAD_READER_USER": READER_USER,
                "TELERAD_READER_PASSWORD": READER_PASSWORD,
                "TELERAD_READER_NAME": RADIOLOGIST, "TELERAD_READER_ORGANIZATION": ORGANIZATION}

    def reader_client(self) -> DicomWebClient:
        return DicomWebClient(ServerSettings(url=self.url, user=READER_USER, password=READER_PASSWORD, **FAST))


def start_telerad(orthanc_factory, folder: Path, site_name: str = CLINIC_SITE) -> Telerad:
    """Orthanc with the clinic and the reader as users, and the clinic's data folder (site name, fast retries)."""
    server = orthanc_factory(extra_users={READER_USER: READER_PASSWORD})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({"server": {"site_name": site_name, **FAST}}))
    return Telerad(server=server, clinic_data=folder)


def telerad_env(monkeypatch, telerad: Telerad) -> None:
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in telerad.env().items():
        monkeypatch.setenv(key, value)


def forward(series: Series, positive: bool, data_dir: Path) -> str:
    """Forward ``series`` with a made-up AI result (tests/forward_helpers.py); see ``forward_analysed``."""
    return forward_analysed(series, make_study_result(series, positive=positive), data_dir)


def forward_analysed(series: Series, result: StudyResult, data_dir: Path) -> str:
    """Enqueue and deliver one case as the clinic app does; returns the study UID the server holds."""
    settings = resolve_settings(data_dir=data_dir)
    with open_outbox(data_dir) as outbox, open_pseudonyms(data_dir) as pseudonyms:
        case_id = enqueue_case(series, result, settings, outbox, pseudonyms)
        with DicomWebClient(settings) as client:
            report = deliver_pending(outbox, client, case_ids=[case_id], force=True)
        assert report.outcome(case_id).delivered, report.outcome(case_id)
        return outbox.case(case_id).study_uid

