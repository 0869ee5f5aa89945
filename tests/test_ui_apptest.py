"""The clinic app through streamlit.testing.v1.AppTest: upload flow, example study, bad uploads,
settings, outbox and forwarding. The app runs the tiny test model (tests/model_helpers.py).

Expected numbers come from the engine itself (``analyze_paths`` on the same files): the page
must show exactly what the CLI would write.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from dicom_factory import CTSeriesSpec, non_image_dataset, save, write_series
from forward_helpers import make_study_result, write_ct_series
from model_helpers import shared_tiny_model
from orthanc_helpers import orthanc_factory  # noqa: F401 - fixture
from pydicom.uid import BasicTextSRStorage, MRImageStorage
from streamlit.testing.v1 import AppTest
from ui_helpers import TRIAGE_LABELS, block_series_zip, free_port, phantom_zip, zip_folder

from app.engine import Analyzer, analyze_paths, results_json
from app.ui import BANNER, PAGE_SCRIPTS
from app.ui.telerad import CLINIC_USER_KEY

MAIN = Path(__file__).resolve().parents[1] / "app" / "ui" / "main.py"
TIMEOUT_S = 90
SUSPICIOUS, CLEAR = TRIAGE_LABELS
SECRET = "s3cret-Pa55-do-not-show"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ui_uploads")
    return {"positive": block_series_zip(root, positive=True), "negative": block_series_zip(root, positive=False)}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return phantom_zip(tmp_path_factory.mktemp("ui_phantom"), positive=True, n_slices=12)


@pytest.fixture
def app_env(monkeypatch, tmp_path, tiny_model) -> Iterator[Path]:
    """The app on the tiny model with a fresh data folder; no server settings leak in from outside."""
    monkeypatch.setenv("MYELOMA_MODEL", str(tiny_model))
    data = tmp_path / "app-data"
    monkeypatch.setenv("MYELOMA_APP_DATA", str(data))
    for key in ("MYELOMA_VARIANT", "MYELOMA_THREADS", "TELERAD_URL", "TELERAD_USER", "TELERAD_PASSWORD",
                "TELERAD_TOKEN", "TELERAD_CA_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    import app.ui.state

    app.ui.state._recent_jobs.clear()  # one process runs every test's sessions
    with serving_at("localhost"):  # as make run serves it
        yield data


@contextmanager
def serving_at(address: str | None) -> Iterator[None]:
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", address)
    try:
        yield
    finally:
        config.set_option("server.address", before)


def start_app(secrets: dict[str, str] | None = None) -> AppTest:
    at = AppTest.from_file(str(MAIN), default_timeout=TIMEOUT_S)
    at.secrets.update(secrets or {})  # as if in .streamlit/secrets.toml
    at.run()
    assert not at.exception
    assert [w.value.strip("*") for w in at.warning] == [BANNER]  # AppTest keeps it only in a session's first run
    return at


def all_text(at: AppTest) -> str:
    """Every piece of text the page shows (and every widget value), for 'never shown' checks."""
    parts = []
    for kind in ("title", "subheader", "markdown", "caption", "error", "warning", "success", "info", "metric",
                 "text_input", "exception"):
        for element in getattr(at, kind):
            parts += [str(getattr(element, attr, "")) for attr in ("value", "label", "body", "message")]
    return "\n".join(parts)


def assert_friendly(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    text = all_text(at)
    assert "Traceback" not in text and 'File "' not in text


def shown(elements, text: str) -> str:
    """The first of ``elements`` (at.error, at.warning ...) whose text contains ``text``; "" if none."""
    return next((e.value for e in elements if text in e.value), "")


def upload(at: AppTest, *files: tuple[str, bytes]) -> AppTest:
    for name, data in files:
        at.file_uploader(key="uploads").upload(name, data, "application/octet-stream")
    at.form_submit_button[0].click()
    return at.run()


def engine_result(path: Path, model: Path, tmp_path: Path):
    studies, _ = analyze_paths([path], Analyzer(str(model)), tmp_path / "engine")
    assert len(studies) == 1
    return studies[0][1]


def image_captions(at: AppTest) -> list[str]:
    return [caption for image in at.get("image") for caption in image.captions]


def triage_shown(at: AppTest) -> str:
    shown = [e.value.strip("*") for e in (*at.error, *at.success) if e.value.strip("*") in TRIAGE_LABELS]
    assert len(shown) == 1, all_text(at)
    return shown[0]


# --- navigation -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", sorted(p.name for p in PAGE_SCRIPTS.glob("*.py")))
def test_every_page_opens_without_a_server(page, app_env):
    at = start_app()
    at.switch_page(f"page_scripts/{page}").run()
    assert_friendly(at)
    assert at.title  # the page drew itself (a friendly message when it needs a server)


def test_no_pages_folder_next_to_the_entry_script():
    # Streamlit would run app/ui/pages/*.py as an old-style multipage app on a fresh server's first
    # visit to e.g. /settings, skipping main.py: no decision-support banner, no navigation.
    # Page scripts belong in app/ui/page_scripts/ (app.ui.PAGE_SCRIPTS).
    assert not (MAIN.parent / "pages").exists()


# --- upload flow --------------------------------------------------------------------------


@pytest.mark.parametrize("kind, label", [("positive", SUSPICIOUS), ("negative", CLEAR)])
def test_upload_shows_the_engine_result(kind, label, uploads, app_env, tiny_model, tmp_path):
    expected = engine_result(uploads[kind], tiny_model, tmp_path)
    at = upload(start_app(), (uploads[kind].name, uploads[kind].read_bytes()))
    assert_friendly(at)
    assert expected.triage_label == label
    assert triage_shown(at) == label
    assert at.metric[0].label == "Study probability"
    assert at.metric[0].value == f"{expected.probability:.1%}"
    assert {b.label for b in at.get("download_button")} == {
        "Download result (JSON)", "Download summary (PDF)", "Download summary (PNG)"}
    text = all_text(at)
    assert "tiny-test" in text and "Decision threshold" in text  # model card
    # The viewer opens on the most suspicious slice; the key images are there.
    slider = at.slider(key=f"slice_{expected.series_instance_uid}")
    assert slider.value == expected.key_slices(1)[0] + 1
    captions = image_captions(at)
    assert f"Slice {expected.key_slices(1)[0] + 1} of 24" in captions
    assert sum(c.startswith("Slice ") and " · p " in c for c in captions) == 4  # key-image thumbnails


def test_phantom_zip_upload_matches_the_cli(phantom, app_env, tiny_model, tmp_path):
    expected = engine_result(phantom, tiny_model, tmp_path)
    at = upload(start_app(), ("phantom.zip", phantom.read_bytes()))
    assert_friendly(at)
    assert at.metric[0].value == f"{expected.probability:.1%}"
    assert triage_shown(at) == expected.triage_label
    job = at.session_state["analysis_job"]
    (series, result), = job.outcome.studies
    assert series.n_slices == 12 and result.to_json()["slices"] == expected.to_json()["slices"]


def test_slice_viewer_follows_the_slider_and_key_images(uploads, app_env):
    at = upload(start_app(), ("ct.zip", uploads["positive"].read_bytes()))
    (series, result), = at.session_state["analysis_job"].outcome.studies
    slider = at.slider(key=f"slice_{result.series_instance_uid}")
    slider.set_value(2).run()
    assert_friendly(at)
    assert "Slice 2 of 24" in image_captions(at)
    at.toggle(key="viewer_overlay").set_value(False).run()
    at.selectbox(key="viewer_window").set_value("Soft tissue (L 40 / W 400)").run()
    assert_friendly(at)
    # "Show" under a key image moves the viewer to that slice.
    top = result.key_slices(1)[0]
    at.button(key=f"show_{top}").click().run()
    assert at.slider(key=f"slice_{result.series_instance_uid}").value == top + 1


def test_the_model_is_loaded_once_for_all_runs_and_sessions(uploads, app_env):
    at = upload(start_app(), ("a.zip", uploads["positive"].read_bytes()))
    first = at.session_state["analysis_job"]._model
    at = upload(at, ("b.zip", uploads["negative"].read_bytes()))
    assert at.session_state["analysis_job"].source == "b.zip"
    assert at.session_state["analysis_job"]._model is first
    other_session = upload(start_app(), ("c.zip", uploads["negative"].read_bytes()))
    assert other_session.session_state["analysis_job"]._model is first


def test_the_json_download_is_the_cli_document_with_the_users_file_names(uploads, app_env):
    at = upload(start_app(), ("ct.zip", uploads["positive"].read_bytes()), ("notes.txt", b"hello"))
    assert_friendly(at)
    assert shown(at.warning, "could not be used")
    job = at.session_state["analysis_job"]
    document = results_json([r for _, r in job.outcome.studies], job.outcome.errors)
    assert document["studies"][0]["positive"] is True
    assert document["errors"] == [{"path": "notes.txt", "error": job.outcome.errors[0].error}]


# --- example study ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["With lytic lesions", "Without lesions"])
def test_example_study_button(kind, app_env):
    at = start_app()
    at.radio(key="example_kind").set_value(kind)
    at.button(key="try_example").click().run()
    assert_friendly(at)
    job = at.session_state["analysis_job"]
    assert job.source == f"example study ({kind.lower()})"
    (series, result), = job.outcome.studies
    assert series.n_slices == 48 and series.hu.shape[1:] == (512, 512)
    assert triage_shown(at) == result.triage_label
    assert at.metric[0].value == f"{result.probability:.1%}"


# --- bad uploads ----------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _dataset_bytes(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, tuple[str, bytes]]:
    root = tmp_path_factory.mktemp("hostile")
    mr = write_series(root / "mr", CTSeriesSpec(n_slices=8, modality="MR", sop_class=MRImageStorage))
    ct = write_series(root / "ct", CTSeriesSpec(n_slices=8))
    whole = ct.paths[0].read_bytes()
    huge = pydicom.dcmread(ct.paths[0])
    huge.Rows = huge.Columns = 40000  # claims 3 GB of pixels; must be refused before decoding
    sr = save(non_image_dataset(BasicTextSRStorage, "SR"), root / "sr.dcm")
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM0001", b"\0" * (8 << 20))  # ~1000:1
    return {
        "text file": ("notes.txt", b"patient list, not an image\n"),
        "MR instead of CT": ("mr.zip", _zip({p.name: p.read_bytes() for p in mr.paths})),
        "truncated DICOM": ("slice.dcm", whole[: len(whole) // 2]),
        "zip slip": ("evil.zip", _zip({"../../escape.dcm": whole})),
        "damaged zip": ("broken.zip", b"PK\x03\x04" + b"\x00garbage" * 50),
        "empty zip": ("empty.zip", _zip({})),
        "gzip archive": ("ct.tar.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 64),
        "too few slices": ("three.zip", _zip({p.name: p.read_bytes() for p in ct.paths[:3]})),
        "zip bomb": ("bomb.zip", bomb.getvalue()),
        "zip in a zip": ("outer.zip", _zip({"inner.zip": _zip({p.name: p.read_bytes() for p in ct.paths})})),
        "enormous image header": ("huge.dcm", _dataset_bytes(huge)),
        "structured report": ("report.dcm", sr.read_bytes()),
    }


@pytest.mark.parametrize("case", ["text file", "MR instead of CT", "truncated DICOM", "zip slip", "damaged zip",
                                  "empty zip", "gzip archive", "too few slices", "zip bomb", "zip in a zip",
                                  "enormous image header", "structured report"])
def test_bad_upload_gets_a_friendly_message(case, hostile, app_env):
    name, data = hostile[case]
    at = upload(start_app(), (name, data))
    assert_friendly(at)
    errors = [e.value for e in at.error]
    assert errors and errors[0].startswith("No analysable CT series was found in the input.")
    if case != "empty zip":  # an empty archive has no file to blame
        assert name in errors[0] or "the uploaded files" in errors[0], errors[0]
    assert "/tmp" not in errors[0]  # paths as the user knows them, not the server's temp folders
    assert not at.metric  # no result


def test_an_upload_form_without_files_asks_for_files(app_env):
    at = start_app()
    at.form_submit_button[0].click().run()
    assert_friendly(at)
    assert any("Choose DICOM files" in w.value for w in at.warning)


def test_a_broken_model_is_reported_in_the_page(app_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MYELOMA_MODEL", str(tmp_path / "no-such-model"))
    at = start_app()
    assert_friendly(at)
    assert shown(at.error, "unknown model")


# --- settings -------------------------------------------------------------------------------


def test_settings_show_credentials_only_masked(app_env, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    monkeypatch.setenv("TELERAD_URL", url)
    monkeypatch.setenv("TELERAD_USER", "radiology")
    monkeypatch.setenv("TELERAD_PASSWORD", SECRET)
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    assert_friendly(at)
    assert at.text_input[0].value == url and at.text_input[1].value == "radiology"
    assert SECRET not in all_text(at)
    assert "environment (TELERAD_PASSWORD)" in all_text(at)
    at.button(key="test_connection").click().run()
    assert_friendly(at)
    assert shown(at.error, "unreachable") and SECRET not in all_text(at)


def test_settings_take_credentials_from_secrets_toml(app_env):
    url = "https://telerad.example.org/dicom-web"
    at = start_app({"TELERAD_URL": url, "TELERAD_USER": "reader", "TELERAD_PASSWORD": SECRET})
    at.switch_page("page_scripts/settings.py").run()
    assert_friendly(at)
    assert at.text_input[0].value == url and at.text_input[1].value == "reader"
    assert "(.streamlit/secrets.toml)" in all_text(at) and SECRET not in all_text(at)


def test_settings_save_writes_the_file_without_secrets(app_env, monkeypatch):
    monkeypatch.setenv("TELERAD_PASSWORD", SECRET)
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    at.text_input[0].set_value("https://telerad.example.org/dicom-web")
    at.text_input[1].set_value("reader")
    at.form_submit_button[0].click().run()
    assert_friendly(at)
    saved = (app_env / "settings.json").read_text()
    assert json.loads(saved)["server"]["url"] == "https://telerad.example.org/dicom-web"
    assert json.loads(saved)["server"]["user"] == "reader"
    assert SECRET not in saved
    assert at.text_input[0].value == "https://telerad.example.org/dicom-web"


@pytest.mark.parametrize("url, problem", [("https://reader:pw@telerad.example.org/dicom-web", "contains credentials"),
                                          ("ftp://telerad.example.org", "not an http(s) URL"),
                                          ("http://telerad.example.org/dicom-web", "plain http")])
def test_settings_refuse_unsafe_urls(url, problem, app_env):
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    at.text_input[0].set_value(url)
    at.form_submit_button[0].click().run()
    assert_friendly(at)
    assert shown(at.error, problem)
    assert not (app_env / "settings.json").exists()


def test_settings_session_password_is_used_not_shown(app_env, monkeypatch):
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    at.text_input(key="session_password").set_value(SECRET).run()
    assert "typed for this session" in all_text(at)
    assert SECRET not in "\n".join(m.value for m in at.markdown)
    at.switch_page("page_scripts/outbox.py").run()  # e.g. to retry a case with it
    at.run()
    assert at.session_state["session_password"] == SECRET  # not dropped with the Settings page's widget
    at.switch_page("page_scripts/settings.py").run()
    assert "typed for this session" in all_text(at)


def test_settings_threads_and_variant_apply_to_the_session(app_env):
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    at.number_input[0].set_value(1)
    at.form_submit_button[1].click().run()
    assert_friendly(at)
    assert at.session_state["model_threads"] == 1 and at.session_state["model_variant"] == "float32"
    assert shown(at.success, "float32 with 1 thread(s)")


def test_a_variant_that_cannot_load_leaves_the_session_on_its_model(app_env, monkeypatch, tmp_path, tiny_model):
    from model_helpers import copy_model_folder

    from model_zoo.card import Variant, load_card

    folder = copy_model_folder(tiny_model, tmp_path / "model")
    (folder / "model_broken.tflite").write_bytes(b"not a TFLite file")
    card = load_card(folder)
    card.variants["broken"] = Variant(file="model_broken.tflite", kind="float32")
    card.record_hashes()
    card.save()
    monkeypatch.setenv("MYELOMA_MODEL", str(folder))
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    next(box for box in at.selectbox if box.label == "Model variant").set_value("broken")
    at.form_submit_button[1].click().run()
    assert_friendly(at)
    assert shown(at.error, "keeps its previous choice")
    at.switch_page("page_scripts/analyze.py").run()  # still usable: the page loads its working model
    assert_friendly(at)
    assert not at.error


@pytest.mark.orthanc
def test_test_connection_succeeds_against_a_real_server(app_env, monkeypatch, orthanc_factory):  # noqa: F811
    server = orthanc_factory()
    monkeypatch.setenv("TELERAD_URL", server.dicomweb_url)
    monkeypatch.setenv("TELERAD_USER", server.user)
    monkeypatch.setenv("TELERAD_PASSWORD", server.password)
    at = start_app()
    at.switch_page("page_scripts/settings.py").run()
    at.button(key="test_connection").click().run()
    assert_friendly(at)
    assert shown(at.success, "accepted the credentials")
    monkeypatch.setenv("TELERAD_PASSWORD", "wrong")
    at.button(key="test_connection").click().run()
    assert shown(at.error, "refused the credentials")


# --- forwarding and outbox -------------------------------------------------------------------


def _unreachable_server(app_env: Path) -> str:
    """A settings file pointing at a closed loopback port, with fast give-up."""
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    app_env.mkdir(parents=True, exist_ok=True)
    (app_env / "settings.json").write_text(json.dumps({"server": {
        "url": url, "retry_attempts": 1, "connect_timeout_s": 1.0, "backoff_initial_s": 0.01,
        "backoff_max_s": 0.01}}))
    return url


def test_forward_without_a_server_says_where_to_set_it(uploads, app_env):
    at = upload(start_app(), ("ct.zip", uploads["positive"].read_bytes()))
    at.button(key="forward").click().run()
    assert_friendly(at)
    assert any("No teleradiology server is configured" in w.value for w in at.warning)


def forward_and_wait(at: AppTest) -> AppTest:
    """Click 'Forward for review', wait for the background task, show its outcome."""
    at.button(key="forward").click().run()
    assert_friendly(at)
    (task,) = [at.session_state[k] for k in at.session_state if str(k).startswith("forward_")]
    assert task.wait(TIMEOUT_S)
    return at.run()


def uploaded_forwardable_study(at: AppTest, tmp_path: Path) -> AppTest:
    write_ct_series(tmp_path / "ct", n_slices=10)  # complete patient/study modules, as forwarding needs
    return upload(at, ("ct.zip", zip_folder(tmp_path / "ct", tmp_path / "ct.zip").read_bytes()))


def test_forward_queues_the_case_when_the_server_is_down(app_env, tmp_path):
    _unreachable_server(app_env)
    at = forward_and_wait(uploaded_forwardable_study(start_app(), tmp_path))
    assert_friendly(at)
    assert any("Queued in the outbox" in w.value and "unreachable" in w.value for w in at.warning)
    at.switch_page("page_scripts/outbox.py").run()
    assert_friendly(at)
    table = at.dataframe[0].value
    assert list(table["State"]) == ["queued"] and list(table["On server"]) == ["0/14"]  # 10 slices + SR + 3 SC
    assert list(table["Tries"]) == [1] and "unreachable" in table["Last error"][0]


def test_a_forward_that_failed_before_queueing_can_be_tried_again(app_env, tmp_path, monkeypatch):
    import app.ui.forwarding
    from app.domain import AppError

    def cannot_queue(*_args):
        raise AppError("the study lacks its patient module")

    _unreachable_server(app_env)
    monkeypatch.setattr(app.ui.forwarding, "enqueue_case", cannot_queue)
    at = forward_and_wait(uploaded_forwardable_study(start_app(), tmp_path))
    assert_friendly(at)
    assert "Nothing was queued" in shown(at.error, "patient module")
    at.button(key="forward_again").click().run()
    assert_friendly(at)
    assert at.button(key="forward").label == "Forward for review"  # offered again, not stuck on the error
    assert not at.error


@pytest.mark.orthanc
def test_forward_delivers_to_a_real_server(app_env, monkeypatch, tmp_path, orthanc_factory):  # noqa: F811
    server = orthanc_factory()
    monkeypatch.setenv("TELERAD_URL", server.dicomweb_url)
    monkeypatch.setenv("TELERAD_USER", server.user)
    monkeypatch.setenv("TELERAD_PASSWORD", server.password)
    at = forward_and_wait(uploaded_forwardable_study(start_app(), tmp_path))
    assert_friendly(at)
    assert any("Delivered" in m.value and "all 14 objects" in m.value for m in at.success)
    assert len(server.sop_instance_uids()) == 14
    at.switch_page("page_scripts/outbox.py").run()
    assert list(at.dataframe[0].value["State"]) == ["delivered"]


def test_outbox_lists_cases_and_retries(app_env, tmp_path):
    from app.forward import enqueue_case, open_outbox, open_pseudonyms
    from app.settings import resolve_settings

    at = start_app()
    at.switch_page("page_scripts/outbox.py").run()
    assert shown(at.info, "The outbox is empty")
    _unreachable_server(app_env)
    series = write_ct_series(tmp_path / "ct", n_slices=8)
    with open_outbox() as outbox, open_pseudonyms() as pseudonyms:
        case_id = enqueue_case(series, make_study_result(series), resolve_settings(), outbox, pseudonyms)
    at.run()
    assert_friendly(at)
    assert list(at.dataframe[0].value["Case"]) == [case_id]
    at.button(key="retry_now").click().run()
    assert_friendly(at)
    assert shown(at.info, "in the background")  # the page stays usable while it sends
    assert at.session_state["outbox_retry"].wait(TIMEOUT_S)
    at.run()
    assert_friendly(at)
    assert "unreachable" in shown(at.warning, "still queued")
    assert list(at.dataframe[0].value["Tries"]) == [1]



def test_inbox_keeps_showing_the_reads_it_has_when_the_server_is_down(app_env, tmp_path, monkeypatch):
    from datetime import UTC, datetime

    import app.ui.inbox_page
    from app.forward import open_outbox
    from app.inbox import InboxRead, open_inbox
    from app.outbox import ItemKind
    from app.reads import Agreement, ReadReport, Urgency

    url = _unreachable_server(app_env)
    series = write_ct_series(tmp_path / "ct", n_slices=2)
    with open_outbox() as outbox:  # a delivered case, so checking for reads must ask the server
        outbox.mark_delivered(outbox.add_case(url, False, [(ItemKind.IMAGE, pydicom.dcmread(f)) for f in series.files]))
    report = ReadReport("2.25.1", "2.25.2", "2.25.3", "2.25.4", "Curie^Marie", "Org", datetime.now(UTC),
                        Agreement.AGREE, Urgency.URGENT, True, "Lytic lesion", ())
    with open_inbox(app_env) as inbox:
        inbox.add(InboxRead(report, "case-1", "1.2.3", "PID-7", "suspicious", 0.0, None, None))
    checks = []
    fetch_reads = app.ui.inbox_page.fetch_reads
    monkeypatch.setattr(app.ui.inbox_page, "fetch_reads", lambda *a, **k: (checks.append(1), fetch_reads(*a, **k))[1])
    at = start_app()
    at.switch_page("page_scripts/inbox.py").run()
    assert len(checks) == 1 and shown(at.caption, "Automatic check failed")
    at.text_input(key=CLINIC_USER_KEY).input("Nurse Joy").run()
    assert len(checks) == 1  # a failed automatic check waits its interval: clicks are not held up by the network
    at.button(key="inbox_check").click().run()
    assert len(checks) == 2
    assert_friendly(at)
    assert shown(at.error, "Could not check for new reads")
    assert list(at.dataframe[0].value["Patient ID"]) == ["PID-7"]  # the urgent read already here stays visible


def test_forwarding_a_study_again_sends_the_waiting_case_not_a_copy(app_env, tmp_path):
    _unreachable_server(app_env)
    first = forward_and_wait(uploaded_forwardable_study(start_app(), tmp_path))
    (task,) = [first.session_state[k] for k in first.session_state if str(k).startswith("forward_")]
    again = forward_and_wait(upload(start_app(), ("ct.zip", (tmp_path / "ct.zip").read_bytes())))  # a new session
    assert_friendly(again)
    assert f"case {task.case_id}" in shown(again.info, "already waiting in the outbox")
    again.switch_page("page_scripts/outbox.py").run()
    table = again.dataframe[0].value
    assert list(table["Case"]) == [task.case_id] and list(table["Tries"]) == [2]


def test_outbox_moves_cases_queued_for_a_mistyped_address_to_the_configured_server(app_env, tmp_path):
    from app.forward import enqueue_case, open_outbox, open_pseudonyms
    from app.settings import resolve_settings

    mistyped = _unreachable_server(app_env)
    series = write_ct_series(tmp_path / "ct", n_slices=8)
    with open_outbox() as outbox, open_pseudonyms() as pseudonyms:
        case_id = enqueue_case(series, make_study_result(series), resolve_settings(), outbox, pseudonyms)
    corrected = _unreachable_server(app_env)  # the user fixed the address in Settings
    at = start_app()
    at.switch_page("page_scripts/outbox.py").run()
    assert_friendly(at)
    assert mistyped in shown(at.warning, "not sent until you move them")
    at.button(key="outbox_retarget").click().run()
    assert_friendly(at)
    assert corrected in shown(at.success, f"Case {case_id} now goes to")
    assert list(at.dataframe[0].value["Destination"]) == [corrected]
    at.run()
    assert not [w for w in at.warning if "not sent until you move them" in w.value]


def test_after_a_browser_refresh_the_last_analysis_can_be_shown_again(uploads, app_env):
    at = upload(start_app(), ("first.zip", uploads["positive"].read_bytes()))
    at = upload(at, ("second.zip", uploads["negative"].read_bytes()))
    job, label = at.session_state["analysis_job"], triage_shown(at)
    refreshed = start_app()  # a refresh is a new session with an empty session state
    assert_friendly(refreshed)
    listed = [m.value for m in refreshed.markdown if "first.zip" in m.value or "second.zip" in m.value]
    assert len(listed) == 1 and "second.zip" in listed[0] and label in listed[0]  # the last one, with its call
    refreshed.button(key="recent_0").click().run()
    assert_friendly(refreshed)
    assert refreshed.session_state["analysis_job"] is job and triage_shown(refreshed) == label
    refreshed = upload(refreshed, ("third.zip", uploads["negative"].read_bytes()))
    assert not job.cancel_requested, "a job shown again may be another tab's: a new analysis does not cancel it"


@pytest.mark.parametrize("address", ["0.0.0.0", None])  # None: a plain streamlit run listens everywhere
def test_recent_analyses_are_not_offered_when_the_app_is_served_on_a_network(address, uploads, app_env):
    upload(start_app(), ("first.zip", uploads["positive"].read_bytes()))
    with serving_at(address):
        other_computer = start_app()
    assert "first.zip" not in all_text(other_computer)
    assert "first.zip" in all_text(start_app())
