"""Forwarding against a real Orthanc (DICOMweb plugin, HTTP Basic auth) on loopback.

Every test ends by checking that the server holds exactly the case's instances (slices + SR +
key images), each once: none lost, none duplicated, nothing else. Faults come from the server
itself (down, wrong password, a Lua filter) or from a loopback proxy (HTTP 500, 202 partial
failure, a stalled answer, a slow link for kill -9 mid-upload).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from model_helpers import shared_tiny_model

from app.cli import main
from app.dicomweb import DicomWebClient
from app.forward import (
    WATCH_MIN_SLEEP_S,
    deliver_pending,
    enqueue_case,
    open_outbox,
    open_pseudonyms,
    retry_now,
    watch,
)
from app.outbox import CaseState, ItemState
from app.settings import ServerSettings
from tests import orthanc_helpers
from tests.forward_helpers import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, make_study_result, write_ct_series
from tests.orthanc_helpers import LUA_DROP_ONCE, LUA_FAIL_ONCE, PASSWORD, USER, FaultProxy, make_tls_files

orthanc_factory = orthanc_helpers.orthanc_factory  # the fixture, used by name below

pytestmark = pytest.mark.orthanc

N_SLICES, N_KEY_IMAGES = 10, 3
FAST = {"connect_timeout_s": 2.0, "read_timeout_s": 10.0, "retry_attempts": 3, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2, "batch_size": 4}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    """(folder, Series) of a 10-slice CT study with a known patient identity."""
    folder = tmp_path_factory.mktemp("ct")
    return folder, write_ct_series(folder, n_slices=N_SLICES, size=64)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture
def app_data(tmp_path, monkeypatch) -> Path:
    """A fresh app data dir with fast network settings; no server settings leak in from the environment."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "settings.json").write_text(json.dumps({"server": FAST}))
    monkeypatch.setenv("MYELOMA_APP_DATA", str(folder))
    for name in ("TELERAD_URL", "TELERAD_USER", "TELERAD_PASSWORD", "TELERAD_TOKEN", "TELERAD_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return folder


def settings_for(url: str, **overrides) -> ServerSettings:
    return ServerSettings(**({"url": url, "user": USER, "password": PASSWORD} | FAST | overrides))


def queue(series, settings: ServerSettings, app_data: Path) -> tuple[str, set[str]]:
    """Enqueue one case through the library API; returns (case id, SOP Instance UIDs to deliver)."""
    with open_outbox(app_data) as outbox, open_pseudonyms(app_data) as pseudonyms:
        case_id = enqueue_case(series, make_study_result(series), settings, outbox, pseudonyms)
        return case_id, {item.sop_instance_uid for item in outbox.items(case_id)}


def deliver(settings: ServerSettings, app_data: Path):
    with open_outbox(app_data) as outbox, DicomWebClient(settings) as client:
        return deliver_pending(outbox, client, force=True)


def case_state(app_data: Path, case_id: str):
    with open_outbox(app_data) as outbox:
        return outbox.case(case_id)


def assert_server_holds_exactly(server, expected: set[str]) -> None:
    stored = server.sop_instance_uids()
    assert len(stored) == len(set(stored)), "an instance is stored twice"
    assert set(stored) == expected, (f"missing {len(expected - set(stored))}, "
                                     f"unexpected {len(set(stored) - expected)}")


def uid_values(ds: pydicom.Dataset) -> set[str]:
    found: set[str] = set()
    ds.walk(lambda _, e: found.update(map(str, e.value if e.VM > 1 else [e.value])) if e.VR == "UI" and e.value
            else None)
    return found


def env_with(**values: str) -> dict[str, str]:
    return {**os.environ, **values, "PYTHONPATH": str(REPO)}


# --- delivery and what reaches the server -----------------------------------------------------------
def test_forward_delivers_every_instance_sr_and_key_images_deidentified(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    settings = settings_for(server.dicomweb_url)
    case_id, expected = queue(series, settings, app_data)
    assert len(expected) == N_SLICES + 1 + N_KEY_IMAGES

    report = deliver(settings, app_data)

    assert report.outcome(case_id).delivered
    assert case_state(app_data, case_id).state == CaseState.DELIVERED
    assert_server_holds_exactly(server, expected)
    stored = server.datasets()
    assert Counter(ds.Modality for ds in stored) == {"CT": N_SLICES, "SR": 1, "OT": N_KEY_IMAGES}
    original_uids = set()
    for path in series.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        original_uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.FrameOfReferenceUID}
    for ds in stored:
        assert str(ds.PatientName) != PATIENT_NAME and "Quillfeather" not in str(ds.PatientName)
        assert ds.PatientID != PATIENT_ID and ds.get("PatientBirthDate", "") != BIRTH_DATE
        assert ds.PatientIdentityRemoved == "YES"
        assert not uid_values(ds) & original_uids, f"an original UID reached the server in the {ds.Modality} object"

    sr = next(ds for ds in stored if ds.Modality == "SR")
    referenced: set[str] = set()
    sr.walk(lambda _, e: referenced.add(e.value) if e.keyword == "ReferencedSOPInstanceUID" else None)
    with DicomWebClient(settings) as client:
        on_server = client.study_instance_uids(sr.StudyInstanceUID)  # QIDO-RS
        assert referenced and referenced <= on_server, "every SR reference resolves on the server"
        fetched = client.retrieve_instance(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID)  # WADO-RS
        assert fetched.VerificationFlag == "UNVERIFIED"
        (study,) = client.search_studies(PatientID=sr.PatientID)  # the worklist view of the teleradiologist
        assert study["0020000D"]["Value"] == [sr.StudyInstanceUID]
    with open_pseudonyms(app_data) as pseudonyms:  # a read coming back can be matched at the clinic
        assert pseudonyms.by_pseudonymous_study(sr.StudyInstanceUID).original_study_uid == series.study_instance_uid


def test_destination_without_deidentification_receives_the_original(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    settings = settings_for(server.dicomweb_url, deidentify=False)
    case_id, expected = queue(series, settings, app_data)
    assert deliver(settings, app_data).outcome(case_id).delivered
    assert_server_holds_exactly(server, expected)
    assert set(series.sop_instance_uids) <= expected
    assert {ds.PatientID for ds in server.datasets()} == {PATIENT_ID}
    assert not case_state(app_data, case_id).deidentified


def test_tls_is_verified_and_a_custom_ca_bundle_is_trusted(orthanc_factory, ct, app_data, tmp_path):
    _, series = ct
    tls = make_tls_files(tmp_path / "tls")
    server = orthanc_factory()
    with FaultProxy(server.http_port, lambda method, path, n: "pass", tls=tls) as proxy:
        assert proxy.dicomweb_url.startswith("https://")
        untrusted = settings_for(proxy.dicomweb_url, retry_attempts=1)  # system CA store: does not know our CA
        case_id, expected = queue(series, untrusted, app_data)
        outcome = deliver(untrusted, app_data).outcome(case_id)
        assert not outcome.delivered and "TLS verification" in outcome.error
        assert proxy.requests == [] and server.sop_instance_uids() == []
        trusted = settings_for(proxy.dicomweb_url, ca_bundle=str(tls.ca_pem))
        assert deliver(trusted, app_data).outcome(case_id).delivered
    assert_server_holds_exactly(server, expected)


# --- the CLI ----------------------------------------------------------------------------------------
def test_forward_cli_delivers_and_exits_0(orthanc_factory, ct, tiny_model, app_data, monkeypatch, capsys, tmp_path):
    folder, _ = ct
    server = orthanc_factory()
    monkeypatch.setenv("TELERAD_USER", USER)
    monkeypatch.setenv("TELERAD_PASSWORD", PASSWORD)
    out = tmp_path / "result.json"
    code = main(["forward", str(folder), "--server", server.dicomweb_url, "--model", str(tiny_model),
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["studies"][0]["model"]["name"] == "tiny-test"
    stored = server.sop_instance_uids()
    assert len(stored) == len(set(stored)) == N_SLICES + 1 + N_KEY_IMAGES
    assert main(["outbox", "status"]) == 0
    assert "1 case(s): 0 queued, 1 delivered" in capsys.readouterr().out


def test_server_down_at_forward_time_exits_3_then_flush_delivers(orthanc_factory, ct, tiny_model, app_data,
                                                                 monkeypatch, capsys):
    folder, _ = ct
    server = orthanc_factory(start=False)  # its port is chosen, nobody listens yet
    monkeypatch.setenv("TELERAD_URL", server.dicomweb_url)
    monkeypatch.setenv("TELERAD_USER", USER)
    monkeypatch.setenv("TELERAD_PASSWORD", PASSWORD)

    assert main(["forward", str(folder), "--model", str(tiny_model)]) == 3
    err = capsys.readouterr().err
    assert "queued for later delivery" in err and "unreachable" in err and PASSWORD not in err
    with open_outbox(app_data) as outbox:
        (case,) = outbox.cases()
        expected = {i.sop_instance_uid for i in outbox.items(case.case_id)}
    assert case.state == CaseState.QUEUED and case.attempts == 1 and "unreachable" in case.last_error

    server.start()
    assert main(["outbox", "flush"]) == 0, capsys.readouterr().err
    assert_server_holds_exactly(server, expected)
    assert case_state(app_data, case.case_id).state == CaseState.DELIVERED
    assert main(["outbox", "flush"]) == 0  # nothing left: a second flush is a no-op
    assert_server_holds_exactly(server, expected)


def test_outbox_watch_retries_when_due_and_delivers_once_the_server_is_back(orthanc_factory, ct, app_data,
                                                                            monkeypatch, capsys):
    _, series = ct
    server = orthanc_factory(start=False)  # down when the watch starts
    settings = settings_for(server.dicomweb_url, outbox_backoff_s=0.5)  # first automatic retry within 0.5 s
    case_id, expected = queue(series, settings, app_data)
    waits = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        state = case_state(app_data, case_id)  # the first try failed; the case waits for its retry
        assert state.state == CaseState.QUEUED and state.attempts == 1 and "unreachable" in state.last_error
        server.start()
        time.sleep(seconds)

    with open_outbox(app_data) as outbox:
        assert watch(outbox, settings, sleep=sleep) == 0
    assert waits == [WATCH_MIN_SLEEP_S]  # one wait: the retry was due after it
    assert case_state(app_data, case_id).state == CaseState.DELIVERED
    assert_server_holds_exactly(server, expected)
    monkeypatch.setenv("TELERAD_URL", server.dicomweb_url)
    assert main(["outbox", "watch"]) == 0  # nothing queued: returns at once
    assert "every case delivered" in capsys.readouterr().out


def test_wrong_password_is_reported_without_the_secret_then_delivery_succeeds(orthanc_factory, ct, app_data,
                                                                              monkeypatch, capsys, caplog):
    _, series = ct
    server = orthanc_factory()
    wrong = "Wrong-Secret-9911"
    case_id, expected = queue(series, settings_for(server.dicomweb_url), app_data)
    monkeypatch.setenv("TELERAD_USER", USER)
    monkeypatch.setenv("TELERAD_PASSWORD", wrong)
    caplog.set_level("DEBUG")

    assert main(["-v", "outbox", "flush", "--server", server.dicomweb_url]) == 3
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "TELERAD_PASSWORD" in err
    assert server.sop_instance_uids() == []
    state = case_state(app_data, case_id)
    assert "401" in state.last_error and state.n_pending == state.n_items
    for text in (err, caplog.text, state.last_error):
        assert wrong not in text and PASSWORD not in text
    for f in app_data.rglob("*.sqlite*"):
        assert wrong.encode() not in f.read_bytes() and PASSWORD.encode() not in f.read_bytes()

    monkeypatch.setenv("TELERAD_PASSWORD", PASSWORD)
    assert main(["outbox", "flush", "--server", server.dicomweb_url]) == 0
    assert_server_holds_exactly(server, expected)


def test_http_500_is_retried_with_backoff_within_one_delivery(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    with FaultProxy(server.http_port, lambda method, path, n: "error500" if n < 2 else "pass") as proxy:
        settings = settings_for(proxy.dicomweb_url)
        case_id, expected = queue(series, settings, app_data)
        assert deliver(settings, app_data).outcome(case_id).delivered
    assert proxy.count("POST", "error500") == 2
    assert_server_holds_exactly(server, expected)


def test_persistent_http_500_keeps_the_case_until_the_server_recovers(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    broken = {"on": True}
    with FaultProxy(server.http_port, lambda method, path, n: "error500" if broken["on"] else "pass") as proxy:
        settings = settings_for(proxy.dicomweb_url)
        case_id, expected = queue(series, settings, app_data)
        outcome = deliver(settings, app_data).outcome(case_id)
        assert not outcome.delivered and "HTTP 500" in outcome.error
        assert proxy.count("POST", "error500") == settings.retry_attempts
        assert server.sop_instance_uids() == []
        broken["on"] = False
        with open_outbox(app_data) as outbox:  # the UI's "retry now" button
            assert retry_now(case_id, settings, outbox).delivered
    assert_server_holds_exactly(server, expected)


def test_partial_failure_202_resends_only_the_failed_instances(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    refused_once: set[str] = set()
    victims: set[str] = set()

    def refuse(uid: str) -> bool:  # every third instance fails on its first upload
        if uid in victims and uid not in refused_once:
            refused_once.add(uid)
            return True
        return False

    with FaultProxy(server.http_port, lambda method, path, n: "partial" if method == "POST" else "pass",
                    refuse=refuse) as proxy:
        settings = settings_for(proxy.dicomweb_url)
        case_id, expected = queue(series, settings, app_data)
        victims.update(sorted(expected)[::3])
        assert deliver(settings, app_data).outcome(case_id).delivered
    assert refused_once == victims
    assert any(status == 202 for _, _, _, status in proxy.requests)
    uploads = Counter(proxy.uploaded)
    assert {uid for uid, n in uploads.items() if n == 2} == victims, "exactly the failed ones were resent"
    assert set(uploads) == expected and max(uploads.values()) == 2
    assert_server_holds_exactly(server, expected)


@pytest.mark.parametrize("lua", [LUA_DROP_ONCE, LUA_FAIL_ONCE], ids=["acknowledged-not-stored", "left-out"])
def test_server_answering_200_while_losing_instances_is_caught(orthanc_factory, ct, app_data, lua):
    _, series = ct
    server = orthanc_factory(lua=lua)  # answers 200 but stores fewer than sent
    settings = settings_for(server.dicomweb_url)
    case_id, expected = queue(series, settings, app_data)
    assert deliver(settings, app_data).outcome(case_id).delivered
    with open_outbox(app_data) as outbox:
        assert any(item.attempts > 0 for item in outbox.items(case_id)), "some instances had to be resent"
    assert_server_holds_exactly(server, expected)


def test_read_timeout_then_resend_is_harmless(orthanc_factory, ct, app_data):
    _, series = ct
    server = orthanc_factory()
    # The first upload reaches the server, but its answer never comes back in time.
    with FaultProxy(server.http_port, lambda method, path, n: "stall" if n == 0 else "pass", stall_s=20) as proxy:
        settings = settings_for(proxy.dicomweb_url, read_timeout_s=1.0)
        case_id, expected = queue(series, settings, app_data)
        started = time.monotonic()
        assert deliver(settings, app_data).outcome(case_id).delivered
        assert time.monotonic() - started < 15, "the client gave up on the stalled answer and resent"
    assert proxy.count("POST", "stall") == 1
    assert_server_holds_exactly(server, expected)


def test_kill_9_mid_upload_then_restart_delivers_everything_once(orthanc_factory, ct, tiny_model, app_data,
                                                                 monkeypatch, capsys):
    folder, _ = ct
    server = orthanc_factory()
    settings = json.loads((app_data / "settings.json").read_text())
    settings["server"]["batch_size"] = 2  # 7 requests for the case: a slow link makes several rounds
    (app_data / "settings.json").write_text(json.dumps(settings))
    slow_link = {"on": True}
    with FaultProxy(server.http_port, lambda method, path, n: "slow" if slow_link["on"] and method == "POST"
                    else "pass", slow_s=0.7) as proxy:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "forward", str(folder), "--server", proxy.dicomweb_url,
             "--model", str(tiny_model)],
            env=env_with(MYELOMA_APP_DATA=str(app_data), TELERAD_USER=USER, TELERAD_PASSWORD=PASSWORD),
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and process.poll() is None:
            if sum(1 for m, _, _, status in proxy.requests if m == "POST" and status == 200) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, f"forward ended before it could be killed: {process.communicate()}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL

        with open_outbox(app_data) as outbox:
            (case,) = outbox.cases()
            expected = {i.sop_instance_uid for i in outbox.items(case.case_id)}
            sent = [i for i in outbox.items(case.case_id) if i.state == ItemState.SENT]
        assert case.state == CaseState.QUEUED and 0 < len(sent) < len(expected)
        assert 0 < len(server.sop_instance_uids()) < len(expected)

        # restart: a new process flushes the outbox (the killed one's lock died with it)
        slow_link["on"] = False
        monkeypatch.setenv("TELERAD_USER", USER)
        monkeypatch.setenv("TELERAD_PASSWORD", PASSWORD)
        assert main(["outbox", "flush"]) == 0, capsys.readouterr().err
    assert_server_holds_exactly(server, expected)
    assert case_state(app_data, case.case_id).state == CaseState.DELIVERED
