"""Case page (teleradiologist): one forwarded case - images, the AI result, and the read.

Images come from the server with WADO-RS when first shown and stay in a session cache
(``app.case_images``); the viewer opens on the AI's most suspicious slice, in the bone window,
with the AI's finding boxes from the SR; the AI key images (Secondary Capture, heatmap overlay)
are below. The read (agree/disagree, confirmed lesions, impression, urgency) is saved on the
server as a verified SR (``app.reads``). Opening a case and saving a read go to the audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import streamlit as st
from PIL import Image, ImageDraw

from app.audit import Action, open_audit_log
from app.case_images import CaseImages, InstanceRef, list_case_images
from app.dicomweb import DicomWebClient
from app.reads import Agreement, LesionMark, MarkKind, Read, ReadReport, Urgency, save_read
from app.ui.state import friendly_errors
from app.ui.telerad import (
    CASE_KEY,
    ENTRIES_KEY,
    case_name,
    fetch_entries,
    image_cache,
    local_time,
    reader_identity,
    reader_panel,
    reader_settings,
    waited,
    worklist_entries,
)
from app.ui.viewer import WINDOWS, FindingMark, render_slice, thumbnail
from app.worklist import WorklistEntry

READ_COLOUR = (255, 170, 0)  # the radiologist's marks: amber, apart from the AI's cyan boxes
POINT_RADIUS_PX = 4
VIEWED_KEY = "cases_viewed"  # studies whose viewing is in the audit log for this session
SENT_READS_KEY = "reads_sent"  # (study uid, agreement, urgency, impression) of reads sent this session
MARKS_KEY = "read_marks"  # {study uid: [LesionMark]} the radiologist added (besides confirmed AI findings)
IMAGES_KEY = "case_images"  # {(study uid, instances on the server): CaseImages}


def _marks(study_uid: str) -> list[LesionMark]:
    return st.session_state.setdefault(MARKS_KEY, {}).setdefault(study_uid, [])


def slider_key(study_uid: str) -> str:
    return f"case_slice_{study_uid}"


def render() -> None:
    st.title("Case")
    with friendly_errors():
        _page()


def _entry(client: DicomWebClient) -> WorklistEntry | None:
    # The worklist of the last visit (a slider move must not query the server); the button asks again,
    # e.g. for an AI result still on its way or a colleague's read.
    if st.button("Refresh from the server", key="case_refresh", icon=":material/refresh:"):
        st.session_state.pop(ENTRIES_KEY, None)
    entries = worklist_entries() or fetch_entries(client)
    by_uid = {e.study_uid: e for e in entries}
    if not by_uid:
        st.info("No case on the server yet.")
        return None
    uids = list(by_uid)
    current = st.session_state.get(CASE_KEY)
    # No widget key: the choice lives in CASE_KEY, which the Worklist sets when it opens a case.
    study = st.selectbox("Case", uids, index=uids.index(current) if current in by_uid else 0,
                         format_func=lambda uid: case_name(by_uid[uid]))
    st.session_state[CASE_KEY] = study
    return by_uid[study]


def _images(client: DicomWebClient, entry: WorklistEntry) -> CaseImages:
    cached = st.session_state.setdefault(IMAGES_KEY, {})
    key = (entry.study_uid, entry.n_instances)
    if key not in cached:
        cached[key] = list_case_images(client, entry.study_uid, entry.ai.key_slice_uids if entry.ai else ())
    return cached[key]


def _page() -> None:
    reader_panel()
    name, organization = reader_identity()
    settings = reader_settings()
    if not settings.url:
        st.warning("No teleradiology server is configured for the reader: set TELERAD_READER_URL.")
        return
    if not name:
        st.warning("Enter your name under 'Reader and connection' to open cases: views and reads are signed.")
        return
    with DicomWebClient(settings) as client:
        entry = _entry(client)
        if entry is None:
            return
        viewed = st.session_state.setdefault(VIEWED_KEY, set())
        if entry.study_uid not in viewed:
            open_audit_log().append(name, Action.CASE_VIEWED, entry.study_uid)
            viewed.add(entry.study_uid)
        _summary(entry)
        if entry.ai is None:
            st.warning("The AI result of this case has not arrived yet (the clinic may still be sending it): the "
                       "images are shown; the read form appears when the AI result is there (press 'Refresh from "
                       "the server').")
        images = _images(client, entry)
        _viewer(client, entry, images)
        _key_images(client, entry, images)
        for read in entry.reads:
            _show_read(read, images)
        if entry.ai is None:
            return
        if entry.reads:  # read already: another one is an addendum, not a second click on "send"
            with st.expander("Add another read (addendum)"):
                _read_form(client, entry, images, name, organization)
        else:
            _read_form(client, entry, images, name, organization)


def _summary(entry: WorklistEntry) -> None:
    now = datetime.now(UTC)
    cols = st.columns(4)
    if entry.ai:
        cols[0].metric("AI probability", f"{entry.ai.probability:.1%}")
        cols[1].metric("Threshold", f"{entry.ai.threshold:.1%}")  # the same scale as the probability
    cols[2].metric("Clinic", entry.clinic)
    cols[3].metric("Waiting", waited(entry.waiting_s(now)) if entry.arrived_at else "-")
    if entry.ai:
        show = st.error if entry.ai.positive else st.success
        show(f"**AI: {entry.ai.triage_label}**", icon=":material/smart_toy:")
        model = entry.ai.model
        st.caption(f"AI model: {model.name} {model.version}" + (f" ({model.variant})" if model.variant else "")
                   + f" · sha256 {model.sha256[:16]}… · case {entry.case_ref} · arrived {local_time(entry.arrived_at)}"
                   " · AI output is decision support, not a diagnosis.")


def _draw_read_marks(picture: Image.Image, marks: list[tuple[int, LesionMark]]) -> Image.Image:
    """The radiologist's marks (numbered as listed under Read) on the slice picture."""
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(picture.size) / 256))
    for number, mark in marks:
        if mark.kind == MarkKind.POINT:
            x, y = mark.coords
            r = POINT_RADIUS_PX * width
            draw.ellipse((x - r, y - r, x + r, y + r), outline=READ_COLOUR, width=width)
            draw.text((x + r + 2, y - r), f"R{number}", fill=READ_COLOUR)
        else:
            draw.rectangle(mark.coords, outline=READ_COLOUR, width=width)
            draw.text((mark.coords[0], mark.coords[3] + 2), f"R{number}", fill=READ_COLOUR)  # AI labels go on top
    return picture


def _viewer(client: DicomWebClient, entry: WorklistEntry, images: CaseImages) -> None:
    st.subheader("Images")
    n = len(images.slices)
    key = slider_key(entry.study_uid)
    if key not in st.session_state:
        first = entry.ai.key_slice_uids[0] if entry.ai and entry.ai.key_slice_uids else ""
        st.session_state[key] = (images.index_of(first) or 0) + 1  # the AI's most suspicious slice
    image_col, control_col = st.columns([3, 2], gap="large")
    with control_col:
        number = st.slider("Slice", 1, n, key=key) if n > 1 else 1
        window = st.selectbox("Window", list(WINDOWS), key="case_window")
        show_ai = st.toggle("AI findings (boxes from the SR)", value=True, key="case_show_ai")
        ref = images.slices[number - 1]
        findings = [f for f in (entry.ai.findings if entry.ai else ()) if f.sop_instance_uid == ref.sop_instance_uid]
        for f in findings:
            st.markdown(f"**F{f.number}**: AI finding, peak probability {f.probability:.1%} on this slice "
                        f"(rows {f.bbox_px[0]}-{f.bbox_px[2]}, columns {f.bbox_px[1]}-{f.bbox_px[3]})")
    with image_col:
        cache = image_cache()
        hu = cache.pixels(client, ref)
        marks = [FindingMark(f.number, f.bbox_px, True) for f in findings] if show_ai else []
        picture = render_slice(hu, None, WINDOWS[window], marks)
        drafted = [(n, m) for n, m in enumerate(_draft(entry, images), start=1)
                   if m.sop_instance_uid == ref.sop_instance_uid]
        st.image(_draw_read_marks(picture, drafted), caption=f"Slice {number} of {n}", width="stretch")
    control_col.caption(f"{n} slices; {sum(cache.is_cached(r) for r in images.slices)} fetched so far "
                        "(WADO-RS, kept for this session). Cyan: AI findings; amber: your marks.")


def _go_to(key: str, number: int) -> None:
    st.session_state[key] = number


def _key_images(client: DicomWebClient, entry: WorklistEntry, images: CaseImages) -> None:
    if not images.key_images:
        return
    st.subheader("AI key images (heatmap overlay)")
    cache = image_cache()
    columns = st.columns(max(3, len(images.key_images)))
    for column, ref in zip(columns, images.key_images, strict=False):
        ds = cache.dataset(client, ref)
        source = ds.SourceImageSequence[0].ReferencedSOPInstanceUID if ds.get("SourceImageSequence") else None
        index = images.index_of(source) if source else None
        with column:
            st.image(thumbnail(_as_image(cache.pixels(client, ref))), width="stretch",
                     caption=f"Slice {index + 1}" if index is not None else "Key image")
            if index is not None:
                st.button("Show", key=f"case_show_{ref.sop_instance_uid}", on_click=_go_to,
                          args=(slider_key(entry.study_uid), index + 1), width="stretch")
    st.caption("Key images are AI output (Secondary Capture): heatmap over the bone window; not for diagnosis.")


def _as_image(pixels) -> Image.Image:
    return Image.fromarray(pixels)


def _show_read(read: ReadReport, images: CaseImages) -> None:
    show = st.error if read.urgent else st.info
    slices = sorted({(images.index_of(m.sop_instance_uid) or 0) + 1 for m in read.lesions})
    show(f"**Read by {read.radiologist.replace('^', ' ')}** ({read.organization}) on {local_time(read.verified_at)}: "
         f"{read.agreement}s with the AI, {'URGENT' if read.urgent else 'routine'}, lytic lesion "
         f"{'present' if read.lesion_present else 'absent'}"
         + (f", {len(read.lesions)} lesion(s) on slice(s) {', '.join(map(str, slices))}" if read.lesions else "")
         + f".  \nImpression: {read.impression}", icon=":material/verified:")


# --- the read -----------------------------------------------------------------------------------
def _ai_boxes(entry: WorklistEntry, images: CaseImages) -> dict[int, LesionMark]:
    """Each AI finding as the box a radiologist confirms (same pixel edges as the AI SR's polyline)."""
    boxes = {}
    for f in entry.ai.findings if entry.ai else ():
        index = images.index_of(f.sop_instance_uid)
        if index is None:
            continue
        row0, col0, row1, col1 = f.bbox_px
        boxes[f.number] = LesionMark(f.sop_instance_uid, images.slices[index].sop_class_uid, MarkKind.BOX,
                                     (float(col0), float(row0), float(col1 + 1), float(row1 + 1)))
    return boxes


def _confirm_key(entry: WorklistEntry, number: int) -> str:
    return f"confirm_{entry.study_uid}_{number}"


def _draft(entry: WorklistEntry, images: CaseImages) -> list[LesionMark]:
    """The lesions the read will hold: confirmed AI findings, then the radiologist's own marks."""
    confirmed = [box for number, box in _ai_boxes(entry, images).items()
                 if st.session_state.get(_confirm_key(entry, number))]
    return confirmed + _marks(entry.study_uid)


def _add_mark(marks: list[LesionMark], ref: InstanceRef, size: tuple[int, int]) -> None:
    """Button callback (runs before the page, so the image shows the new mark at once)."""
    state = st.session_state
    x, y = float(state["mark_x"]), float(state["mark_y"])
    if state["mark_kind"] == MarkKind.BOX:
        coords = (x, y, min(float(size[0]), x + state["mark_w"]), min(float(size[1]), y + state["mark_h"]))
    else:
        coords = (x, y)
    marks.append(LesionMark(ref.sop_instance_uid, ref.sop_class_uid, MarkKind(state["mark_kind"]), coords))


def _read_form(client: DicomWebClient, entry: WorklistEntry, images: CaseImages, name: str,
               organization: str) -> None:
    st.subheader("Read")
    marks = _marks(entry.study_uid)
    number = st.session_state.get(slider_key(entry.study_uid), 1)
    ref = images.slices[number - 1]
    with st.container(border=True):
        st.markdown("**Confirmed lesions**")
        for finding, box in _ai_boxes(entry, images).items():
            index = images.index_of(box.sop_instance_uid)
            st.checkbox(f"Confirm AI finding F{finding} (box on slice {index + 1})", key=_confirm_key(entry, finding),
                        persist_state="session")  # a draft survives a visit to the worklist
        kind = st.radio("Add your own mark on the slice shown", [str(k) for k in MarkKind], horizontal=True,
                        key="mark_kind")
        rows, cols = image_cache().pixels(client, ref).shape[:2]
        inputs = st.columns(4)
        inputs[0].number_input("x (column)", 0.0, float(cols - 1), float(cols // 2), key="mark_x")
        inputs[1].number_input("y (row)", 0.0, float(rows - 1), float(rows // 2), key="mark_y")
        if kind == MarkKind.BOX:
            inputs[2].number_input("width", 1.0, float(cols), 10.0, key="mark_w")
            inputs[3].number_input("height", 1.0, float(rows), 10.0, key="mark_h")
        st.button(f"Add {kind} on slice {number}", key="add_mark", on_click=_add_mark,
                  args=(marks, ref, (cols, rows)))
        confirmed = [n for n in _ai_boxes(entry, images) if st.session_state.get(_confirm_key(entry, n))]
        for i, mark in enumerate(_draft(entry, images)):
            index = images.index_of(mark.sop_instance_uid)
            text = ", ".join(f"{c:g}" for c in mark.coords)
            origin = f" - confirmed AI finding F{confirmed[i]}" if i < len(confirmed) else ""
            left, right = st.columns([5, 1], vertical_alignment="center")
            left.markdown(f"R{i + 1}: {mark.kind} ({text}) on slice {index + 1 if index is not None else '?'}{origin}")
            if not origin:
                own = i - len(confirmed)
                right.button("Remove", key=f"remove_mark_{own}", on_click=marks.pop, args=(own,))
    uid = entry.study_uid  # the form's fields belong to this case: another case starts empty
    # Not an st.form: a form's fields reach the app only on submit, so a draft would be lost on a
    # visit to the worklist; these keep theirs for the session.
    with st.container(border=True):
        # Nothing pre-selected: agreeing with the AI and the urgency are decisions, not defaults.
        agreement = st.radio("The AI result", [str(a) for a in Agreement], horizontal=True, index=None,
                             format_func=lambda a: "I agree" if a == Agreement.AGREE else "I disagree",
                             key=f"read_agreement_{uid}", persist_state="session")
        urgency = st.radio("Urgency", [str(u) for u in Urgency], horizontal=True, index=None,
                           key=f"read_urgency_{uid}", persist_state="session")
        impression = st.text_area("Impression", key=f"read_impression_{uid}", height=120, persist_state="session")
        signed = st.button(f"Sign as {name.replace('^', ' ')} and send", type="primary", key=f"sign_read_{uid}")
    if signed and (agreement is None or urgency is None):
        st.error("Choose whether you agree with the AI result and the urgency before signing.")
    elif signed:
        read = Read(agreement=Agreement(agreement), urgency=Urgency(urgency), impression=impression,
                    lesions=tuple(_draft(entry, images)), radiologist=name, organization=organization,
                    verified_at=datetime.now(UTC))
        sent = st.session_state.setdefault(SENT_READS_KEY, set())
        # Not the marks: saving clears the drafted ones, so a second click would differ only there.
        content = (uid, read.agreement, read.urgency, read.impression.strip())
        if not send_once(sent, content, lambda: _save(client, entry, images, read)):
            st.info("This read was already sent; nothing was sent again. Change the impression to add an addendum.")


def send_once(sent: set, content: tuple, save: Callable[[], None]) -> bool:
    """Run ``save`` unless ``content`` is in ``sent`` (one verified read per decision); False if it was.

    Marked before saving: a click during the save stops the run (Streamlit raises a
    BaseException at its next call) after the read may have reached the server, and the
    rerun must not send it again. A save that fails (an Exception) may be tried again.
    """
    if content in sent:
        return False
    sent.add(content)
    try:
        save()
    except Exception:
        sent.discard(content)
        raise
    return True


def _save(client: DicomWebClient, entry: WorklistEntry, images: CaseImages, read: Read) -> None:
    cache = image_cache()
    ai = entry.ai
    ai_sr = cache.dataset(client, InstanceRef(ai.study_uid, ai.series_uid, ai.sop_instance_uid, ai.sop_class_uid, 0))
    marked = {m.sop_instance_uid for m in read.lesions}
    headers = [cache.header(client, ref) for ref in images.slices if ref.sop_instance_uid in marked]
    with st.spinner("Saving the read on the server…"):
        stored = save_read(client, ai_sr, ai, read, headers)
        # Recorded before any further Streamlit call, which could stop this run (a click meanwhile).
        open_audit_log().append(read.radiologist, Action.READ_SAVED, entry.study_uid, stored.sop_instance_uid,
                                f"{stored.agreement}, {stored.urgency}, {len(stored.lesions)} mark(s)")
    st.session_state[MARKS_KEY].pop(entry.study_uid, None)
    st.session_state.pop(ENTRIES_KEY, None)  # the worklist shows the new status on its next load
    st.success(f"Read saved on the server and verified ({stored.urgency}). The clinic will receive it.")
