"""The outbox queue, the settings it is delivered with, and the STOW-RS answer parsing (no server needed)."""

from __future__ import annotations

import base64
import json
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pydicom
import pytest

import app.dicomweb
from app.dicomweb import (
    SOP_INSTANCE_UID_TAG,
    DicomWebClient,
    ServerUnavailable,
    StowOutcome,
    parse_stow_response,
)
from app.domain import AppError
from app.forward import (
    _batches,
    _retry_delay,
    deliver_pending,
    enqueue_case,
    open_outbox,
    open_pseudonyms,
    retarget_case,
    retry_now,
)
from app.outbox import (
    CASES_DIR,
    DB_FILE,
    AlreadyQueued,
    CaseState,
    ItemKind,
    ItemState,
    Outbox,
    OutboxBusy,
    OutboxError,
    OutboxItem,
)
from app.settings import ServerSettings, resolve_settings, save_server_settings, split_credentials
from tests.forward_helpers import make_study_result, write_ct_series
from tests.orthanc_helpers import free_port

SECRET = "pw-Never-Logged-42"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    return write_ct_series(tmp_path_factory.mktemp("ct"), n_slices=8)


@pytest.fixture
def datasets(series):
    return [(ItemKind.IMAGE, pydicom.dcmread(f)) for f in series.files]


def unreachable(**overrides) -> ServerSettings:
    """A loopback URL nobody listens on, with fast retries."""
    values = dict(url=f"http://127.0.0.1:{free_port()}/dicom-web", user="clinic", password=SECRET,
                  retry_attempts=2, backoff_initial_s=0.01, backoff_max_s=0.02, connect_timeout_s=1)
    return ServerSettings(**(values | overrides))


# --- the queue ---------------------------------------------------------------------------
def test_case_survives_reopening_with_its_files(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        case_id = outbox.add_case("https://x/dicom-web", True, datasets, summary="suspicious")
    with Outbox(tmp_path) as reopened:  # e.g. after an app restart
        case = reopened.case(case_id)
        assert case.state == CaseState.QUEUED and case.n_items == case.n_pending == len(datasets)
        assert case.summary == "suspicious" and case.deidentified
        items = reopened.items(case_id)
        assert [i.sop_instance_uid for i in items] == [ds.SOPInstanceUID for _, ds in datasets]
        first = pydicom.dcmread(reopened.case_dir(case_id) / items[0].file)
        assert first.SOPInstanceUID == items[0].sop_instance_uid
        assert reopened.read_file(items[0]) == (reopened.case_dir(case_id) / items[0].file).read_bytes()


def test_item_states_and_delivery_remove_the_files(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        case_id = outbox.add_case("https://x/dicom-web", True, datasets)
        uids = [ds.SOPInstanceUID for _, ds in datasets]
        outbox.mark_sent(case_id, uids[:3])
        outbox.mark_failed(case_id, {uids[1]: "server refused it"})
        case = outbox.case(case_id)
        assert (case.n_sent, case.n_pending) == (2, len(uids) - 2)
        failed = next(i for i in outbox.items(case_id) if i.sop_instance_uid == uids[1])
        assert failed.state == ItemState.PENDING and failed.attempts == 1 and failed.last_error == "server refused it"
        outbox.record_failure(case_id, "server down", retry_in_s=60)
        case = outbox.case(case_id)
        assert case.attempts == 1 and case.last_error == "server down" and case.next_attempt_at > time.time() + 30
        assert outbox.cases(due_before=time.time()) == []
        outbox.mark_confirmed(case_id, uids)
        outbox.mark_delivered(case_id)
        assert outbox.case(case_id).state == CaseState.DELIVERED
        assert not outbox.case_dir(case_id).exists()
        outbox.remove_case(case_id)  # the user clears the history
        assert outbox.cases() == [] and outbox.items(case_id) == []


def test_a_failed_enqueue_leaves_nothing_behind(tmp_path, datasets):
    def broken():
        yield datasets[0]
        raise AppError("file changed since it was analysed")

    with Outbox(tmp_path) as outbox:
        with pytest.raises(AppError):
            outbox.add_case("https://x/dicom-web", True, broken())
        with pytest.raises(OutboxError, match="exactly one study"):
            other = pydicom.dcmread(write_ct_series(tmp_path / "other", n_slices=8, seed=3).files[0])
            outbox.add_case("https://x/dicom-web", True, [datasets[0], (ItemKind.IMAGE, other)])
        assert outbox.cases() == []
        assert list((tmp_path / CASES_DIR).iterdir()) == []


def test_leftover_folders_are_cleaned_on_open(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        case_id = outbox.add_case("https://x/dicom-web", True, datasets)
        outbox.mark_delivered(case_id)
    outbox.case_dir(case_id).mkdir()  # crash between commit and delete
    stale = tmp_path / CASES_DIR / ("0" * 32)  # crash between writing files and committing
    stale.mkdir()
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / CASES_DIR / ("1" * 32)  # an enqueue in progress in another process
    fresh.mkdir()
    Outbox(tmp_path).close()
    assert not outbox.case_dir(case_id).exists() and not stale.exists() and fresh.exists()


def test_only_one_process_delivers_at_a_time(tmp_path):
    with Outbox(tmp_path) as first, Outbox(tmp_path) as second:
        with first.delivery_lock():
            with pytest.raises(OutboxBusy):
                with second.delivery_lock():
                    pass
        with second.delivery_lock():  # released
            pass


def test_batches_respect_count_and_size():
    items = [OutboxItem("c", str(i), ItemKind.IMAGE, f"{i}.dcm", size, ItemState.PENDING, 0, None)
             for i, size in enumerate([10, 10, 10, 50, 10, 10])]
    assert [[i.sop_instance_uid for i in b] for b in _batches(items, 2, 1e9)] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert [len(b) for b in _batches(items, 10, 40)] == [3, 1, 2]  # a big item gets its own batch


def test_outbox_files_are_readable_by_their_owner_only(tmp_path, datasets):
    with Outbox(tmp_path / "outbox") as outbox:  # cases sent without de-identification carry identities
        case_id = outbox.add_case("https://x/dicom-web", False, datasets)
        for path in (tmp_path / "outbox", tmp_path / "outbox" / DB_FILE, outbox.case_dir(case_id)):
            assert path.stat().st_mode & 0o077 == 0, path.name


class FakeServer:
    """A DICOMweb server in memory that may lose what it acknowledged."""

    def __init__(self, url: str, drops: frozenset[str] = frozenset()):
        self.settings = ServerSettings(url=url, retry_attempts=3)
        self.base_url = url
        self.held: set[str] = set()
        self.drops = drops  # acknowledged, never kept
        self.received: list[str] = []

    def store(self, instances):
        uids = [uid for uid, _ in instances]
        self.received += uids
        self.held |= set(uids) - self.drops
        return StowOutcome(200, frozenset(uids))

    def study_instance_uids(self, study_instance_uid: str) -> set[str]:
        return set(self.held)


def test_instances_confirmed_once_and_gone_later_are_sent_again(tmp_path, datasets):
    url = "https://x/dicom-web"
    uids = [ds.SOPInstanceUID for _, ds in datasets]
    with Outbox(tmp_path) as outbox:
        case_id = outbox.add_case(url, True, datasets)
        server = FakeServer(url, drops=frozenset(uids[:1]))
        assert not deliver_pending(outbox, server).outcome(case_id).delivered
        assert outbox.case(case_id).n_confirmed == len(uids) - 1
        server.held.clear()  # the server purged the incomplete study
        server.drops, server.received = frozenset(), []
        assert deliver_pending(outbox, server, force=True).outcome(case_id).delivered
        assert sorted(server.received) == sorted(uids)


def test_retry_delay_stays_finite_however_often_a_case_failed():
    settings = ServerSettings(url="https://x/dicom-web")
    assert 0 < _retry_delay(settings, 5000) <= settings.outbox_backoff_max_s


def test_forwarding_while_another_process_delivers_leaves_the_case_queued(tmp_path, datasets):
    settings = ServerSettings(url=f"http://127.0.0.1:{free_port()}/dicom-web")
    with Outbox(tmp_path) as watcher, Outbox(tmp_path) as app_outbox:
        case_id = app_outbox.add_case(settings.url, True, datasets)
        with watcher.delivery_lock():  # e.g. "outbox watch" is delivering
            outcome = retry_now(case_id, settings, app_outbox)
        assert not outcome.delivered and "another process is delivering" in outcome.error
        assert app_outbox.case(case_id).state == CaseState.QUEUED


def test_a_study_waiting_for_a_server_is_not_queued_twice(tmp_path, datasets):
    built = []

    def building():  # counts the datasets the outbox asked for
        for item in datasets:
            built.append(item)
            yield item

    with Outbox(tmp_path) as outbox:
        first = outbox.add_case("https://a/dicom-web", True, datasets, summary="suspicious, p=0.91")
        with pytest.raises(AlreadyQueued, match=f"case {first}") as refused:
            outbox.add_case("https://a/dicom-web", True, building(), summary="suspicious, p=0.91")
        assert refused.value.case_id == first
        assert len(built) == 1, "the refusal comes at the first dataset, before the rest of the case is built"
        assert [c.case_id for c in outbox.cases()] == [first]
        assert sorted(p.name for p in (tmp_path / CASES_DIR).iterdir()) == [first]
        other = outbox.add_case("https://b/dicom-web", True, datasets, summary="suspicious, p=0.91")  # another server
        newer = outbox.add_case("https://a/dicom-web", True, datasets, summary="suspicious, p=0.88")  # a new analysis
        outbox.mark_delivered(first)
        again = outbox.add_case("https://a/dicom-web", True, datasets, summary="suspicious, p=0.91")  # delivered: new
        assert {c.case_id for c in outbox.cases()} == {first, other, newer, again}


def test_two_processes_forwarding_one_study_at_once_queue_it_once(tmp_path, datasets, monkeypatch):
    check = Outbox._refuse_if_queued
    checked = threading.Event()

    def slow_check(self, db, *args):  # the other forward's check comes while this one is between check and write
        check(self, db, *args)
        if db.in_transaction:
            checked.set()
            time.sleep(1.0)

    monkeypatch.setattr(Outbox, "_refuse_if_queued", slow_check)
    outcomes = []

    def forward():
        with Outbox(tmp_path) as outbox:  # its own connection, as another process has
            try:
                outcomes.append(outbox.add_case("https://a/dicom-web", True, datasets, summary="same"))
            except AlreadyQueued as exc:
                outcomes.append(exc)

    threads = [threading.Thread(target=forward) for _ in range(2)]
    threads[0].start()
    assert checked.wait(10)
    threads[1].start()
    for t in threads:
        t.join(30)
    with Outbox(tmp_path) as outbox:
        assert len(outbox.cases()) == 1
    assert sum(isinstance(o, AlreadyQueued) for o in outcomes) == 1


def test_retarget_sends_a_queued_case_to_the_new_address_from_scratch(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        case_id = outbox.add_case("https://mistyped/dicom-web", True, datasets)
        uids = [ds.SOPInstanceUID for _, ds in datasets]
        outbox.mark_sent(case_id, uids[:2])
        outbox.mark_confirmed(case_id, uids[:1])
        outbox.record_failure(case_id, "name does not resolve", retry_in_s=3600)
        assert outbox.retarget(case_id, "https://right/dicom-web")
        case = outbox.case(case_id)
        assert case.destination == "https://right/dicom-web" and case.state == CaseState.QUEUED
        assert case.n_pending == case.n_items == len(uids), "the old address's acknowledgements do not count"
        assert case.attempts == 0 and case.last_error is None and case.next_attempt_at <= time.time()
        assert outbox.cases(destination="https://right/dicom-web", due_before=time.time())[0].case_id == case_id
        with Outbox(tmp_path) as watcher, watcher.delivery_lock(), pytest.raises(OutboxBusy):
            outbox.retarget(case_id, "https://elsewhere/dicom-web")  # not while "outbox watch" delivers it
        assert outbox.case(case_id).destination == "https://right/dicom-web"
        with pytest.raises(OutboxError, match="already meant for"):
            outbox.retarget(case_id, "https://right/dicom-web")
        delivered = outbox.add_case("https://third/dicom-web", True, datasets)
        outbox.mark_confirmed(delivered, uids)
        outbox.mark_delivered(delivered)
        with pytest.raises(OutboxError, match="already delivered"):
            outbox.retarget(delivered, "https://right/dicom-web")


def test_retarget_to_a_server_that_has_the_study_removes_the_case_instead(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        mistyped = outbox.add_case("https://mistyped/dicom-web", True, datasets, summary="p=0.9")
        forwarded_again = outbox.add_case("https://right/dicom-web", True, datasets, summary="p=0.9")
        assert not outbox.retarget(mistyped, "https://right/dicom-web")  # it waits there already
        assert [c.case_id for c in outbox.cases()] == [forwarded_again]
        assert not outbox.case_dir(mistyped).exists()
        outbox.mark_delivered(forwarded_again)
        mistyped = outbox.add_case("https://mistyped/dicom-web", True, datasets, summary="p=0.9")
        assert not outbox.retarget(mistyped, "https://right/dicom-web")  # it reached that server already
        assert [c.case_id for c in outbox.cases()] == [forwarded_again]


def test_a_case_with_patient_identity_moves_only_to_a_server_that_accepts_identities(tmp_path, datasets):
    with Outbox(tmp_path) as outbox:
        identified = outbox.add_case("https://old-trusted/dicom-web", False, datasets)
        with pytest.raises(AppError, match="patient's identity"):
            retarget_case(identified, ServerSettings(url="https://new/dicom-web", deidentify=True), outbox)
        assert outbox.case(identified).destination == "https://old-trusted/dicom-web"
        assert retarget_case(identified, ServerSettings(url="https://new/dicom-web", deidentify=False), outbox)
        assert outbox.case(identified).destination == "https://new/dicom-web"


def test_outbox_retarget_cli_moves_the_cases_meant_for_other_servers(tmp_path, datasets, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("MYELOMA_APP_DATA", str(tmp_path))
    monkeypatch.delenv("TELERAD_URL", raising=False)
    with open_outbox(tmp_path) as outbox:
        wrong = outbox.add_case("https://mistyped/dicom-web", True, datasets)
        another_study = [(ItemKind.IMAGE, pydicom.dcmread(f)) for f in write_ct_series(tmp_path / "ct", 2).files]
        identified = outbox.add_case("https://other/dicom-web", False, another_study)
    assert main(["outbox", "retarget", "--server", "https://right/dicom-web"]) == 2
    out, err = capsys.readouterr()
    assert f"case {wrong}: now goes to https://right/dicom-web" in out
    assert f"case {identified}: not moved" in err and "patient's identity" in err
    with open_outbox(tmp_path) as outbox:
        assert outbox.case(wrong).destination == "https://right/dicom-web"
        assert outbox.case(identified).destination == "https://other/dicom-web"
    assert main(["outbox", "retarget", "--server", "https://fourth/dicom-web", "--case", wrong]) == 0
    with open_outbox(tmp_path) as outbox:
        assert outbox.case(wrong).destination == "https://fourth/dicom-web"
        outbox.remove_case(identified)
    capsys.readouterr()
    assert main(["outbox", "retarget", "--server", "https://fourth/dicom-web"]) == 0
    assert "no queued case is meant for another server" in capsys.readouterr().out


# --- delivery without a server: queued, with a reason and without the secret ---------------------
def test_unreachable_server_keeps_the_case_queued_without_leaking_credentials(tmp_path, series, caplog):
    settings = unreachable()
    caplog.set_level(logging.DEBUG)
    with open_outbox(tmp_path) as outbox, open_pseudonyms(tmp_path) as pseudonyms:
        case_id = enqueue_case(series, make_study_result(series), settings, outbox, pseudonyms)
        with DicomWebClient(settings) as client:
            report = deliver_pending(outbox, client)
        outcome = report.outcome(case_id)
        assert not outcome.delivered and "unreachable" in outcome.error
        assert report.stopped == outcome.error
        case = outbox.case(case_id)
        assert case.state == CaseState.QUEUED and case.attempts == 1 and case.n_pending == case.n_items
        assert case.next_attempt_at > time.time()
        with DicomWebClient(settings) as client:  # not due yet: an automatic run leaves it alone
            assert deliver_pending(outbox, client).outcomes == []
    assert SECRET not in caplog.text and SECRET not in outcome.error
    for f in tmp_path.rglob("*.sqlite*"):
        assert SECRET.encode() not in f.read_bytes(), f"{f.name} holds the password"
    with sqlite3.connect(tmp_path / "outbox" / "outbox.sqlite") as db:
        assert db.execute("SELECT destination FROM cases").fetchone()[0] == settings.url


# --- settings --------------------------------------------------------------------------------
def test_settings_precedence_flags_then_env_then_file(tmp_path):
    save_server_settings(ServerSettings(url="https://file/dicom-web", user="file-user", password="file-pw",
                                        batch_size=3, deidentify=True), tmp_path)
    env = {"TELERAD_URL": "https://env/dicom-web", "TELERAD_USER": "env-user"}
    merged = resolve_settings(env=env, data_dir=tmp_path)
    assert (merged.url, merged.user, merged.password, merged.batch_size) == (
        "https://env/dicom-web", "env-user", "file-pw", 3)
    flagged = resolve_settings(server="https://flag/dicom-web/", user="flag-user", deidentify=False,
                               env=env, data_dir=tmp_path)
    assert (flagged.url, flagged.user, flagged.deidentify) == ("https://flag/dicom-web", "flag-user", False)
    assert resolve_settings(env={}, data_dir=tmp_path / "empty").deidentify is True  # on by default
    assert "file-pw" not in repr(merged)
    assert (tmp_path / "settings.json").stat().st_mode & 0o077 == 0


def test_credentials_never_stay_in_the_url(tmp_path):
    assert split_credentials("https://u%40x:p%3Aw@host:8443/dicom-web") == ("https://host:8443/dicom-web", "u@x", "p:w")
    settings = resolve_settings(server=f"http://clinic:{SECRET}@127.0.0.1:8042/dicom-web", env={}, data_dir=tmp_path)
    assert settings.url == "http://127.0.0.1:8042/dicom-web"
    assert (settings.user, settings.password) == ("clinic", SECRET)


@pytest.mark.parametrize(("url", "message"), [
    ("", "no teleradiology server configured"),
    ("ftp://host/x", "not an http"),
    ("http://pacs.example.org/dicom-web", "plain http"),
])
def test_unusable_server_urls_are_explained(url, message):
    with pytest.raises(AppError, match=message):
        ServerSettings(url=url).require_url()
    ServerSettings(url="http://pacs.example.org/dicom-web", allow_plain_http=True).require_url()


def test_unknown_settings_are_reported(tmp_path):
    (tmp_path / "settings.json").write_text('{"server": {"url": "https://x", "pasword": "typo"}}')
    with pytest.raises(AppError, match="pasword"):
        resolve_settings(env={}, data_dir=tmp_path)


def test_server_settings_at_the_top_level_of_the_file_are_reported(tmp_path):
    (tmp_path / "settings.json").write_text('{"url": "https://pacs.example.org/dicom-web", "user": "clinic"}')
    with pytest.raises(AppError, match=r'url, user at the top level.*inside "server"'):
        resolve_settings(env={}, data_dir=tmp_path)


@contextmanager
def answering_server(answer):
    """A loopback DICOMweb stand-in: ``answer(method, path, query, headers)`` -> (status, headers, body bytes)."""
    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            url = urlsplit(self.path)
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, headers, body = answer(self.command, url.path, parse_qs(url.query), self.headers)
            self.send_response(status)
            for name, value in (headers | {"Content-Length": str(len(body))}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


DICOM_JSON = {"Content-Type": "application/dicom+json"}


@pytest.mark.parametrize(("credentials", "expected"), [
    ({"token": "tok-123", "user": "clinic", "password": SECRET}, "Bearer tok-123"),  # a token wins
    ({"user": "clinic", "password": SECRET}, "Basic " + base64.b64encode(f"clinic:{SECRET}".encode()).decode()),
])
def test_client_authenticates_with_bearer_token_or_basic(credentials, expected):
    seen: list[str | None] = []

    def answer(method, path, query, headers):
        seen.append(headers.get("Authorization"))
        return 200, DICOM_JSON, b"[]"

    with answering_server(answer) as url, DicomWebClient(ServerSettings(url=url, **credentials)) as client:
        assert client.study_instance_uids("1.2.3") == set()
    assert seen == [expected]


def _instances(*uids: str) -> bytes:
    return json.dumps([{SOP_INSTANCE_UID_TAG: {"vr": "UI", "Value": [u]}} for u in uids]).encode()


def test_query_pages_while_the_server_says_it_cut_the_results_short(monkeypatch):
    monkeypatch.setattr(app.dicomweb, "QIDO_PAGE", 3)
    held = [str(i) for i in range(5)]

    def capped(method, path, query, headers):  # answers at most 2 per page, and says so (PS3.18 Warning 299)
        offset = int(query["offset"][0])
        page = held[offset:offset + 2]
        more = {"Warning": '299 server: "The number of results exceeded the maximum"'} if offset + 2 < len(held) else {}
        return 200, DICOM_JSON | more, _instances(*page)

    def ignores_offset(method, path, query, headers):  # always the same full page
        return 200, DICOM_JSON, _instances(*held[:3])

    with answering_server(capped) as url, DicomWebClient(ServerSettings(url=url)) as client:
        assert client.study_instance_uids("1.2.3") == set(held)
    with answering_server(ignores_offset) as url, DicomWebClient(ServerSettings(url=url)) as client:
        assert client.study_instance_uids("1.2.3") == set(held[:3])  # ends instead of looping


def test_a_portal_page_instead_of_dicom_json_is_a_retryable_error_not_a_crash():
    def portal(method, path, query, headers):
        return 200, {"Content-Type": "text/html"}, b"<html><body>Please log in to the hotel Wi-Fi</body></html>"

    with answering_server(portal) as url, DicomWebClient(ServerSettings(url=url, retry_attempts=1)) as client:
        with pytest.raises(ServerUnavailable, match="not DICOM JSON.*text/html"):
            client.study_instance_uids("1.2.3")
        # A STOW answer that is not a JSON object counts as a bare 200: only the query check confirms.
        assert client.store([("1", b"")]).stored == {"1"}


# --- STOW-RS answers --------------------------------------------------------------------------
def _sop_items(*uids, reason=None):
    items = []
    for uid in uids:
        item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            item["00081197"] = {"vr": "US", "Value": [reason]}
        items.append(item)
    return {"vr": "SQ", "Value": items}


def test_stow_answer_all_stored():
    outcome = parse_stow_response(200, {"00081199": _sop_items("1", "2")}, ["1", "2"])
    assert outcome.stored == {"1", "2"} and outcome.failed == {}


def test_stow_answer_partial_202_names_the_failures():
    body = {"00081199": _sop_items("1"), "00081198": _sop_items("2", reason=0xA700)}
    outcome = parse_stow_response(202, body, ["1", "2", "3"])
    assert outcome.stored == {"1"}
    assert "0xA700" in outcome.failed["2"]
    assert outcome.failed["3"] == "server did not acknowledge it"  # neither stored nor failed: resend


def test_stow_answer_200_that_lists_fewer_instances_is_not_trusted():
    # Orthanc's DICOMweb plugin answers 200 and omits instances it dropped
    outcome = parse_stow_response(200, {"00081198": {"vr": "SQ"}, "00081199": _sop_items("1")}, ["1", "2"])
    assert outcome.stored == {"1"} and set(outcome.failed) == {"2"}


def test_stow_answer_bare_200_means_stored_and_failure_wins_over_reference():
    assert parse_stow_response(200, None, ["1"]).stored == {"1"}
    body = {"00081199": _sop_items("1"), "00081198": _sop_items("1", reason=0x0110)}
    assert parse_stow_response(409, body, ["1"]).stored == frozenset()


def test_outbox_watch_does_not_claim_cases_for_other_servers_were_delivered(tmp_path, datasets, capsys):
    from app.forward import watch

    with Outbox(tmp_path) as outbox:
        outbox.add_case("https://mistyped/dicom-web", True, datasets)
        assert watch(outbox, ServerSettings(url="https://right/dicom-web"), sleep=lambda s: None) == 0
    out, err = capsys.readouterr()
    assert "every case delivered" not in out and "nothing queued for https://right/dicom-web" in out
    assert "1 case(s) wait for other servers: https://mistyped/dicom-web" in err and "outbox retarget" in err
