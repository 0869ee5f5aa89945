"""Analyze page: upload a CT (or try an example), follow the progress, read the result.

Flow of one script run: the input controls; then, while an ``AnalysisJob`` runs, its
progress bars and a cancel button (the run polls the job until it ends; a click on
Cancel reruns the script, which finds the same job and cancels it); then the outcome:
friendly errors, or the result with chart, slice viewer, key images, model card,
downloads and forwarding.
"""

from __future__ import annotations

import json
import time

import altair as alt
import pandas as pd
import streamlit as st

from app.domain import Series, StudyResult
from app.engine import results_json
from app.ingest import InputError
from app.ui.forwarding import ForwardTask
from app.ui.jobs import AnalysisJob, JobOutcome, JobStatus, SharedModel, write_example_study, write_uploads
from app.ui.model_info import card_facts, metrics_table
from app.ui.state import current_model, friendly_errors, recent_jobs, server_settings
from app.ui.summary import FORMATS, build_summary
from app.ui.viewer import WINDOWS, key_image, marks_on_slice, render_slice, thumbnail
from model_zoo.card import ModelCard

JOB_KEY = "analysis_job"
SHOWN_AGAIN_KEY = "analysis_job_shown_again"  # the session's job came from the recent list
EXAMPLE_COUNT_KEY = "examples_started"
POLL_S = 0.15
FORWARD_POLL_S = 2.0
EXAMPLE_SEED = 6  # examples are reproducible: the n-th click of a session shows the same study everywhere
EXAMPLE_SLICES = 48
KEY_THUMBNAILS = 4
ERRORS_INLINE = 5
EXAMPLE_KINDS = {"With lytic lesions": True, "Without lesions": False}


def render() -> None:
    st.title("Analyze a CT study")
    with friendly_errors():
        _page()


def _page() -> None:
    shared = current_model()
    job: AnalysisJob | None = st.session_state.get(JOB_KEY)
    started = _inputs(shared, busy=job is not None and not job.finished)
    if started is not None:
        _replace_job(job, started)
        st.rerun()  # draw the inputs disabled while the new job runs
    if job is None:
        _offer_recent()
        return
    if not job.finished:
        _follow(job)
        st.rerun()  # inputs enabled again, then the outcome
    _show_outcome(job)


# --- input ----------------------------------------------------------------------------------


def _inputs(shared: SharedModel, busy: bool) -> AnalysisJob | None:
    """Upload form and example button; returns a started job when the user asked for one."""
    limit_mb = st.get_option("server.maxUploadSize")
    upload_col, example_col = st.columns([3, 2], gap="large")
    with upload_col, st.form("upload_form", clear_on_submit=True):
        files = st.file_uploader(
            "CT images: DICOM files or a zip archive of a study folder", accept_multiple_files=True,
            key="uploads", help="Select all files of the series (Ctrl+A in the folder) or one zip of the folder. "
                                "Files that are not usable CT images are listed with the reason.")
        st.caption(f"Upload limit: {limit_mb:,} MB per file (a 300-slice CT is about 160 MB).")
        submitted = st.form_submit_button("Analyze", type="primary", disabled=busy)
    with example_col:
        st.markdown("**No data at hand?** Try a synthetic CT phantom.")
        kind = st.radio("Example study", list(EXAMPLE_KINDS), horizontal=True, disabled=busy, key="example_kind")
        example = st.button("Try an example study", disabled=busy, key="try_example")
    if submitted:
        if not files:
            st.warning("Choose DICOM files or a zip archive first, then press Analyze.")
            return None
        names = [f.name for f in files]
        source = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return AnalysisJob(source, write_uploads(files), shared).start()
    if example:
        number = st.session_state.get(EXAMPLE_COUNT_KEY, 0)
        st.session_state[EXAMPLE_COUNT_KEY] = number + 1
        positive = EXAMPLE_KINDS[kind]
        prepare = write_example_study(positive, EXAMPLE_SEED, number, EXAMPLE_SLICES)
        return AnalysisJob(f"example study ({kind.lower()})", prepare, shared).start()
    return None


def _replace_job(old: AnalysisJob | None, new: AnalysisJob) -> None:
    """The new job replaces the old one; the old one's files go when nothing uses them any more
    (a forward still queuing them keeps them alive)."""
    if old is not None and not st.session_state.pop(SHOWN_AGAIN_KEY, False):
        old.cancel()  # not a job shown again after a refresh: another tab may be following it
    for key in [k for k in st.session_state if str(k).startswith("forward_")]:
        if st.session_state[key].finished:
            del st.session_state[key]
    st.session_state[JOB_KEY] = new
    if (recent := recent_jobs()) is not None:
        recent.add(new)


def _offer_recent() -> None:
    """After a browser refresh (a new session): the analyses this app ran lately, to show again."""
    recent = recent_jobs()
    jobs = [j for j in recent.jobs() if j.outcome is None or j.outcome.studies] if recent is not None else []
    if not jobs:
        return
    with st.expander("Last analysis on this computer, kept while the app runs" if len(jobs) == 1 else
                     f"Recent analyses on this computer ({len(jobs)}), kept while the app runs",
                     icon=":material/history:"):
        for number, job in enumerate(jobs):
            left, right = st.columns([4, 1], vertical_alignment="center")
            left.markdown(f"{time.strftime('%H:%M', time.localtime(job.started_at))} · {_plain(job.source)} · "
                          f"{_recent_state(job)}")
            if right.button("Show", key=f"recent_{number}"):
                st.session_state[JOB_KEY], st.session_state[SHOWN_AGAIN_KEY] = job, True
                st.rerun()


def _recent_state(job: AnalysisJob) -> str:
    if job.outcome is None:
        return "still running"
    return "; ".join(result.triage_label for _, result in job.outcome.studies)


# --- progress -------------------------------------------------------------------------------


def _follow(job: AnalysisJob) -> None:
    """Progress bars for reading and analysis, and a cancel button, until the job ends."""
    area = st.empty()
    with area.container(border=True):
        st.markdown(f"**Analysing** {job.source}")
        read_bar = st.progress(0.0, text="Reading DICOM files")
        model_bar = st.progress(0.0, text="Analysing slices")
        if st.button("Cancel", key="cancel_analysis", disabled=job.cancel_requested):
            job.cancel()
    while not job.wait(POLL_S):
        _draw_progress(job.status(), read_bar, model_bar)
    area.empty()


def _draw_progress(status: JobStatus, read_bar, model_bar) -> None:
    if status.stage in ("prepare", "read"):
        read_bar.progress(status.fraction, text=status.label)
    else:
        read_bar.progress(1.0, text="Reading DICOM files: done")
        model_bar.progress(status.fraction, text=status.label)


# --- outcome --------------------------------------------------------------------------------


def _show_outcome(job: AnalysisJob) -> None:
    outcome: JobOutcome = job.outcome
    if outcome.cancelled:
        st.info(outcome.message)
        return
    if not outcome.studies:
        st.error(_nothing_analysed_text(outcome))
        _error_table(outcome.errors, expanded=False)
        return
    if outcome.errors:
        st.warning(f"{len(outcome.errors)} file(s) or series could not be used; the result is based on the rest.")
        _error_table(outcome.errors, expanded=False)
    studies = outcome.studies
    chosen = 0
    if len(studies) > 1:
        labels = [f"Study {i + 1}: {s.series_description or s.series_instance_uid} ({s.n_slices} slices)"
                  for i, (s, _) in enumerate(studies)]
        chosen = st.selectbox("Study", range(len(studies)), format_func=labels.__getitem__,
                              key=f"study_{job.root.name}")
    series, result = studies[chosen]
    _result(job, series, result)


def _plain(text: str) -> str:
    """A file name or message safe to put inside Markdown code spans."""
    return str(text).replace("`", "'")


def _nothing_analysed_text(outcome: JobOutcome) -> str:
    lines = [outcome.message]
    for e in outcome.errors[:ERRORS_INLINE]:
        lines.append(f"- `{_plain(e.path)}`: {e.error}")
    if len(outcome.errors) > ERRORS_INLINE:
        lines.append(f"- … and {len(outcome.errors) - ERRORS_INLINE} more (see the list below)")
    return "\n".join(lines)


def _error_table(errors: list[InputError], expanded: bool) -> None:
    if not errors:
        return
    with st.expander(f"Files not used ({len(errors)})", expanded=expanded):
        st.dataframe(pd.DataFrame({"File": [e.path for e in errors], "Problem": [e.error for e in errors]}),
                     hide_index=True, width="stretch")


def _result(job: AnalysisJob, series: Series, result: StudyResult) -> None:
    st.divider()
    score_col, call_col, action_col = st.columns([1, 2, 1], gap="medium")
    aggregation = job.card.aggregation
    score_col.metric("Study probability", f"{result.probability:.1%}",
                     help=f"{aggregation.method.replace('_', ' ')} (k = {aggregation.k}) of the slice "
                          "probabilities; see the model card below.")
    with call_col:
        show = st.error if result.positive else st.success
        show(f"**{result.triage_label}**", icon=":material/warning:" if result.positive else ":material/check_circle:")
        st.caption(f"Decision threshold {result.threshold:.1%} · {series.n_slices} slices · "
                   f"{len(result.findings)} suspicious region(s) · {job.source} · "
                   f"analysed in {job.outcome.elapsed_s:.1f} s")
    with action_col:
        _downloads(job, series, result)
        _forward(job, series, result)
    for warning in result.warnings:
        st.warning(warning)
    _slice_chart(result, job.card.contract.z_step_mm)
    _viewer(series, result)
    _key_images(series, result)
    _model_card(job.card, result)


def _downloads(job: AnalysisJob, series: Series, result: StudyResult) -> None:
    document = json.dumps(results_json([r for _, r in job.outcome.studies], job.outcome.errors), indent=2)
    st.download_button("Download result (JSON)", data=document, file_name="myeloma-ct-result.json",
                       mime="application/json", key="download_json", on_click="ignore", width="stretch")
    for fmt, mime in FORMATS.items():
        st.download_button(f"Download summary ({fmt.upper()})", key=f"download_{fmt}", mime=mime,
                           data=lambda fmt=fmt: build_summary(series, result, fmt),
                           file_name=f"myeloma-ct-summary.{fmt}", on_click="ignore", width="stretch")


# --- forwarding -----------------------------------------------------------------------------


def _forward(job: AnalysisJob, series: Series, result: StudyResult) -> None:
    key = f"forward_{result.series_instance_uid}"
    task: ForwardTask | None = st.session_state.get(key)
    if task is None:
        if not st.button("Forward for review", key="forward", type="primary" if result.positive else "secondary",
                         width="stretch", help="Send the study, the AI result (SR) and the key images to the "
                                               "teleradiology server (de-identified unless configured otherwise)."):
            return
        settings = server_settings()
        if not settings.url:
            st.warning("No teleradiology server is configured; set it on the Settings page.")
            return
        task = st.session_state[key] = ForwardTask(series, result, settings, keep_alive=job).start()
    if task.finished:
        _forward_outcome(task, key)
    else:
        _forward_progress(task)


@st.fragment(run_every=FORWARD_POLL_S)
def _forward_progress(task: ForwardTask) -> None:
    if task.finished:
        st.rerun()  # the whole page shows the outcome
    if task.case_id is None:  # not in the persistent outbox yet: closing the app now would lose it
        st.info("Preparing the case for forwarding (result objects, de-identification): keep the app open "
                "for a moment.", icon=":material/hourglass_top:")
    else:
        st.info(f"Queued as case {task.case_id}; sending to {task.destination} in the background. You can keep "
                "working: the outbox keeps the case if the app is closed.", icon=":material/cloud_upload:")


def _forward_outcome(task: ForwardTask, key: str) -> None:
    if task.already_queued:
        st.info(f"This study was already waiting in the outbox as case {task.case_id}; that case was sent "
                "rather than a second copy.")
    if task.error and task.case_id:
        st.error(f"{task.error}. The case is kept in the outbox as case {task.case_id}: retry it from the Outbox "
                 "page rather than forwarding it again.")
    elif task.error:  # nothing was queued: forwarding may simply be tried again
        st.error(f"{task.error}. Nothing was queued.")
        if st.button("Try forwarding again", key="forward_again"):
            st.session_state.pop(key, None)
            st.rerun()
    elif task.outcome.delivered:
        st.success(f"Delivered (case {task.case_id}): the server confirmed all {task.outcome.expected} objects.")
    else:
        st.warning(f"Queued in the outbox as case {task.case_id} ({task.outcome.confirmed} of "
                   f"{task.outcome.expected} objects on the server): {task.outcome.error or 'not confirmed yet'}. "
                   "Retry from the Outbox page.")


# --- result views ---------------------------------------------------------------------------


def _slider_key(result: StudyResult) -> str:
    return f"slice_{result.series_instance_uid}"


def _slice_chart(result: StudyResult, z_step_mm: float) -> None:
    st.subheader("Probability per slice")
    current = st.session_state.get(_slider_key(result), result.key_slices(1)[0] + 1)
    data = pd.DataFrame({"slice": range(1, len(result.slices) + 1),
                         "probability": [s.probability for s in result.slices],
                         "z_mm": [s.z_mm for s in result.slices]})
    line = alt.Chart(data).mark_line().encode(
        x=alt.X("slice:Q", title="slice", scale=alt.Scale(domain=[1, max(2, len(data))], nice=False)),
        y=alt.Y("probability:Q", scale=alt.Scale(domain=[0, 1]), title="lesion probability"),
        tooltip=["slice", alt.Tooltip("probability:Q", format=".3f"), alt.Tooltip("z_mm:Q", format=".1f")])
    rules = pd.DataFrame({"threshold": [result.threshold]})
    threshold = alt.Chart(rules).mark_rule(color="#b3261e", strokeDash=[4, 4]).encode(y="threshold:Q")
    here = alt.Chart(pd.DataFrame({"slice": [current]})).mark_rule(color="#888").encode(x="slice:Q")
    layers = [line, threshold, here]
    if result.findings:
        spans = pd.DataFrame({"start": [f.slice_start + 0.5 for f in result.findings],
                              "end": [f.slice_end + 1.5 for f in result.findings]})
        layers.insert(0, alt.Chart(spans).mark_rect(color="#b3261e", opacity=0.12).encode(x="start:Q", x2="end:Q"))
    st.altair_chart(alt.layer(*layers).properties(height=220), width="stretch")
    skipped = sum(not s.analysed for s in result.slices)
    note = (f" Thin slices: the model ran on slices about {z_step_mm:g} mm apart; the {skipped} slices in between show "
            "values interpolated along z." if skipped else "")
    st.caption(f"Dashed line: decision threshold {result.threshold:.1%}. Shaded: suspicious slice runs. "
               f"Grey line: the slice shown below.{note}")


def _viewer(series: Series, result: StudyResult) -> None:
    st.subheader("Slice viewer")
    n = series.n_slices
    key = _slider_key(result)
    if key not in st.session_state:
        st.session_state[key] = result.key_slices(1)[0] + 1
    image_col, control_col = st.columns([3, 2], gap="large")
    with control_col:
        number = st.slider("Slice", 1, n, key=key) if n > 1 else 1
        window = st.selectbox("Window", list(WINDOWS), key="viewer_window")
        overlay = st.toggle("Heatmap (CAM) overlay", value=True, key="viewer_overlay")
        index = number - 1
        s = result.slices[index]
        source = "" if s.analysed else " (interpolated between neighbouring analysed slices)"
        st.markdown(f"z = {s.z_mm:.1f} mm · slice probability **{s.probability:.1%}**{source}")
        heatmap = result.heatmaps.get(index)
        if overlay and heatmap is None:
            st.caption("No heatmap for this slice: heatmaps are computed for the most suspicious slices and the "
                       "peak of each finding (see the key images).")
        marks = marks_on_slice(result.findings, index)
        for mark in marks:
            f = result.findings[mark.number - 1]
            st.markdown(f"**F{mark.number}**: slices {f.slice_start + 1}-{f.slice_end + 1}, "
                        f"peak {f.peak_probability:.1%} on slice {f.peak_slice + 1}")
    with image_col:
        picture = render_slice(series.hu[index], heatmap if overlay else None, WINDOWS[window], marks)
        st.image(picture, caption=f"Slice {number} of {n}", width="stretch")


def _show_slice(key: str, number: int) -> None:
    st.session_state[key] = number


def _key_images(series: Series, result: StudyResult) -> None:
    st.subheader("Key images")
    indices = result.key_slices(KEY_THUMBNAILS)
    columns = st.columns(KEY_THUMBNAILS)
    for column, index in zip(columns, indices, strict=False):
        with column:
            p = result.slices[index].probability
            st.image(thumbnail(key_image(series.hu[index], result, index)),
                     caption=f"Slice {index + 1} · p {p:.1%}", width="stretch")
            st.button("Show", key=f"show_{index}", on_click=_show_slice,
                      args=(_slider_key(result), index + 1), width="stretch")


def _model_card(card: ModelCard, result: StudyResult) -> None:
    st.subheader("Model")
    facts = card_facts(card, result.model)
    st.markdown("\n".join(f"- **{label}**: {_plain(value)}" for label, value in facts))
    variant = card.variants.get(result.model.variant)
    tables = [("Validation metrics (study level, at the decision threshold)", metrics_table(card.metrics)),
              (f"Measured on the {result.model.variant} variant", metrics_table(variant.metrics if variant else {}))]
    for title, rows in tables:
        if rows:
            st.markdown(f"**{title}**")
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    if not any(rows for _, rows in tables):
        st.caption("This model card lists no validation metrics.")
