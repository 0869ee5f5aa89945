"""De-identification for forwarding (DICOM PS3.15 Basic Profile via dicognito) and the clinic's pseudonym map.

All instances of a study (the CT slices, the SR and the key images) go through one
``StudyDeidentifier``, so every UID is remapped the same way in every object and the SR's
references keep pointing at the forwarded slices. The dicognito seed is a secret of this
installation combined with the original Patient ID: the same patient gets the same
pseudonym and date shift in every study, so priors stay comparable at the reading site.

On top of dicognito: private elements, overlays and the free-text descriptions of the source
images are removed (dicognito keeps them; PS3.15 removes them: a scanner operator may type a name
there), and so are the identifying attributes dicognito passes through (``IDENTIFYING``: admission
and episode IDs, addresses and phone numbers, staff identification, the device serial number...);
the birth date is emptied (the age stays), PatientIdentityRemoved = YES and
DeidentificationMethod(CodeSequence) describe what was done. Descriptions this app generated
itself (the AI series' "not for diagnostic use" labels) are kept.
Instances that declare burned-in annotation are refused: their pixels may show the patient.
Every object records the de-identification (PS3.15 E.1.1) in Contributing Equipment: purpose
"De-identifying Equipment", when (real time, UTC: when the clinic released the case) and by
which site (``site_name``, also the InstitutionName; without it dicognito's made-up institution
is removed rather than shown to the reader as if it were the sender).

``PseudonymStore`` (SQLite, never sent) maps original study/patient to the pseudonymous study
UID/patient ID, so a read that comes back can be matched to the local patient.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from dicognito.anonymizer import Anonymizer

from app.domain import AppError
from app.sqlite_db import open_wal_database

log = logging.getLogger(__name__)

PSEUDONYM_DB = "pseudonyms.sqlite"
DEIDENTIFICATION_METHOD = ["DICOGNITO", "PS3.15 Basic Profile; dates shifted; private tags removed"]
# Free text of the source (PS3.15 Table E.1-1, action X unless the Clean Descriptors option is applied).
FREE_TEXT = frozenset({
    "StudyDescription", "SeriesDescription", "ImageComments", "DerivationDescription", "ProtocolName",
    "AdditionalPatientHistory", "PatientComments", "StudyComments", "ReasonForStudy",
    "RequestedProcedureDescription", "RequestedProcedureComments", "PerformedProcedureStepDescription",
    "ScheduledProcedureStepDescription", "CommentsOnThePerformedProcedureStep", "AdmittingDiagnosesDescription",
    "AcquisitionComments", "VisitComments", "TextComments", "InterpretationText",
})
# Identifying attributes dicognito leaves as they are (PS3.15 Table E.1-1 action X; "Retain Device
# Identity" is not applied). Removed at every nesting level, sequences whole.
IDENTIFYING = frozenset({
    "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID", "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence", "PatientInstitutionResidence", "MedicalAlerts", "Allergies",
    "ReasonForTheRequestedProcedure", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence", "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianIdentificationSequence", "OperatorIdentificationSequence", "PersonAddress",
    "PersonTelephoneNumbers", "PersonIdentificationCodeSequence", "InstitutionCodeSequence",
    "InstitutionalDepartmentName", "DeviceSerialNumber", "StationName", "PatientBirthTime", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "OtherPatientNames", "PatientBirthName", "MilitaryRank",
    "BranchOfService", "Occupation", "CountryOfResidence", "RegionOfResidence", "PatientReligiousPreference",
    "ResponsiblePerson", "ResponsibleOrganization", "CurrentPatientLocation", "InsurancePlanIdentification",
    "RequestingService",
})
# Overlay (60xx) and curve (50xx) groups: an overlay can carry the patient's name as graphics or text.
_REPEATING_GROUPS = ((0x5000, 0x501E), (0x6000, 0x601E))
# Free text this app writes into its own SR and key images (no patient data); everything else is the source's.
GENERATED_TEXT = frozenset({"SeriesDescription", "ImageComments", "DerivationDescription"})
# PS3.16 CID 7050 "De-identification Method": what dicognito plus this module apply.
METHOD_CODES = (
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ("113108", "Retain Patient Characteristics Option"),
)
DEIDENTIFYING_EQUIPMENT = ("109104", "De-identifying Equipment")  # PS3.16 CID 7005
MANUFACTURER = "myeloma-ct"


@dataclass(frozen=True)
class Pseudonym:
    """One forwarded study: its identity at the clinic and the pseudonyms the server sees."""

    original_study_uid: str
    original_patient_id: str
    pseudo_study_uid: str
    pseudo_patient_id: str
    created_at: float


class PseudonymStore:
    """The clinic-side map original <-> pseudonym, and the installation's dicognito secret."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = open_wal_database(self.path)
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS secret (id INTEGER PRIMARY KEY CHECK (id = 1), "
                             "value TEXT NOT NULL)")
            self._db.execute("INSERT OR IGNORE INTO secret (id, value) VALUES (1, ?)", (secrets.token_hex(32),))
            # One row per pseudonym ever sent: a study forwarded again after its Patient ID was corrected
            # gets a new pseudonym, and a read of either must still find the patient.
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS pseudonyms (pseudo_study_uid TEXT PRIMARY KEY, "
                "original_study_uid TEXT NOT NULL, original_patient_id TEXT NOT NULL, "
                "pseudo_patient_id TEXT NOT NULL, created_at REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS pseudonyms_by_original ON pseudonyms (original_study_uid)")
            if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'studies'").fetchone():
                # the first layout kept one pseudonym per original study
                self._db.execute("INSERT OR IGNORE INTO pseudonyms SELECT pseudo_study_uid, original_study_uid, "
                                 "original_patient_id, pseudo_patient_id, created_at FROM studies")
                self._db.execute("DROP TABLE studies")
        self._secret = self._db.execute("SELECT value FROM secret").fetchone()[0]

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PseudonymStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def seed_for(self, original_patient_id: str) -> str:
        return f"{self._secret}:{original_patient_id}"

    def record(self, pseudonym: Pseudonym) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO pseudonyms (pseudo_study_uid, original_study_uid, original_patient_id, "
                "pseudo_patient_id, created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(pseudo_study_uid) DO NOTHING",
                (pseudonym.pseudo_study_uid, pseudonym.original_study_uid, pseudonym.original_patient_id,
                 pseudonym.pseudo_patient_id, pseudonym.created_at))

    def _one(self, column: str, value: str) -> Pseudonym | None:
        """The newest pseudonym whose ``column`` is ``value``."""
        with self._lock:
            row = self._db.execute(
                "SELECT original_study_uid, original_patient_id, pseudo_study_uid, pseudo_patient_id, created_at "
                f"FROM pseudonyms WHERE {column} = ? ORDER BY created_at DESC LIMIT 1", (value,)).fetchone()
        return Pseudonym(*row) if row else None

    def by_pseudonymous_study(self, study_uid: str) -> Pseudonym | None:
        """Match a study that comes back from the server (e.g. a read SR) to the local patient."""
        return self._one("pseudo_study_uid", study_uid)

    def by_original_study(self, study_uid: str) -> Pseudonym | None:
        return self._one("original_study_uid", study_uid)


def _dcm_code(value: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _method_codes() -> list[pydicom.Dataset]:
    return [_dcm_code(value, meaning) for value, meaning in METHOD_CODES]


def deidentifying_equipment(site_name: str, when: datetime) -> pydicom.Dataset:
    """The Contributing Equipment item that records this de-identification."""
    item = pydicom.Dataset()
    item.Manufacturer = MANUFACTURER
    if site_name:
        item.InstitutionName = site_name[:64]
    item.PurposeOfReferenceCodeSequence = [_dcm_code(*DEIDENTIFYING_EQUIPMENT)]
    item.ContributionDateTime = when.astimezone(UTC).strftime("%Y%m%d%H%M%S.%f+0000")
    item.ContributionDescription = f"De-identified for teleradiology: {DEIDENTIFICATION_METHOD[1]}"
    return item


def _in_repeating_group(tag: pydicom.tag.BaseTag) -> bool:
    return any(low <= tag.group <= high and tag.group % 2 == 0 for low, high in _REPEATING_GROUPS)


def _remove_identifying(ds: pydicom.Dataset, keep: frozenset[str]) -> None:
    """Delete FREE_TEXT (except top-level ones named in ``keep``), IDENTIFYING, overlays and curves at every
    nesting level; empty every PatientBirthDate (before dicognito, which refuses placeholders like 00000000)."""
    for elem in list(ds):
        if (elem.keyword in IDENTIFYING or _in_repeating_group(elem.tag)
                or (elem.keyword in FREE_TEXT and elem.keyword not in keep)):
            del ds[elem.tag]
        elif elem.keyword == "PatientBirthDate":
            elem.value = ""
        elif elem.VR == "SQ":
            for item in elem.value:
                _remove_identifying(item, frozenset())


class StudyDeidentifier:
    """De-identifies, in place, every dataset of one study the same way."""

    def __init__(self, store: PseudonymStore, original_study_uid: str, original_patient_id: str,
                 site_name: str = "") -> None:
        self._store = store
        self._original = (original_study_uid, original_patient_id)
        self._site_name = site_name.strip()
        self._when = datetime.now(UTC)  # one release time for every object of the case
        # Without a Patient ID the study is its own pseudo-patient (never merged with other unknowns).
        self._anonymizer = Anonymizer(seed=store.seed_for(original_patient_id or f"study:{original_study_uid}"))
        self.pseudonym: Pseudonym | None = None

    def __call__(self, ds: pydicom.Dataset, generated: bool = False) -> pydicom.Dataset:
        """De-identify ``ds`` in place. ``generated``: the app built it (SR, key images), so its own
        descriptions stay; what it copied from the source (e.g. the study description) goes."""
        if ds.StudyInstanceUID != self._original[0]:
            raise AppError("an instance of another study was mixed into the case; nothing was sent")
        if str(ds.get("BurnedInAnnotation", "NO")).upper() == "YES":
            raise AppError("an image declares burned-in annotation (text in the pixels may identify the "
                           "patient); it cannot be de-identified automatically; nothing was sent")
        ds.remove_private_tags()
        _remove_identifying(ds, keep=GENERATED_TEXT if generated else frozenset())
        for keyword in ("PatientID", "PatientName"):  # so an object without them gets the study's pseudonym too
            if keyword not in ds:
                setattr(ds, keyword, "")
        try:
            self._anonymizer.anonymize(ds)
        except ValueError as exc:  # dicognito cannot shift a malformed date or time
            raise AppError(f"an image has a date or time that cannot be read ({exc}), so its dates cannot be "
                           "de-identified; nothing was sent") from None
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        ds.DeidentificationMethodCodeSequence = _method_codes()
        for made_up in ("InstitutionName", "InstitutionAddress"):
            ds.pop(made_up, None)
        if self._site_name:
            ds.InstitutionName = self._site_name[:64]
        ds.ContributingEquipmentSequence = [*ds.get("ContributingEquipmentSequence", []),
                                            deidentifying_equipment(self._site_name, self._when)]
        if self.pseudonym is None:
            self.pseudonym = Pseudonym(self._original[0], self._original[1], ds.StudyInstanceUID,
                                       str(ds.get("PatientID", "")), time.time())
            self._store.record(self.pseudonym)
        return ds
