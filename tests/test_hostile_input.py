"""Hostile and bad input: every case becomes an error entry; nothing raises, leaks or escapes the workdir."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import (
    CTSeriesSpec,
    ct_dataset,
    encode_pixels,
    non_image_dataset,
    save,
    with_changes,
    write_series,
    write_zip,
)
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    MPEG2MPML,
    BasicTextSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEG2000Lossless,
    JPEGLSLossless,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

import app.ingest
from app.ingest import DEFAULT_LIMITS, IngestLimits, ingest

REPO = Path(__file__).resolve().parents[1]
PATIENT_DATA = ("Test^Patient", "Test", "TEST-0001")


def run(tmp_path: Path, *inputs, limits: IngestLimits = DEFAULT_LIMITS):
    result = ingest(list(inputs), tmp_path / "work", limits=limits)
    for entry in result.errors + result.skipped:  # never patient data in a message
        assert "\n" not in entry.error
        assert not any(word in entry.error for word in PATIENT_DATA), entry.error
    return result


def errors_by_name(result) -> dict[str, str]:
    return {Path(e.path.split("!")[-1]).name: e.error for e in result.errors}


def one_file(folder: Path, spec: CTSeriesSpec, name: str = "one.dcm") -> Path:
    """A single image of ``spec`` as ``folder/name``."""
    written = write_series(folder / ".tmp-one", with_changes(spec, positions=(0.0,)))
    target = folder / name
    written.paths[0].rename(target)
    (folder / ".tmp-one").rmdir()
    return target


@pytest.fixture
def valid(tmp_path):
    """A good series in tmp_path/in/series next to which the bad files go."""
    return write_series(tmp_path / "in" / "series", CTSeriesSpec())


def assert_valid_series_survives(result, valid) -> None:
    assert len(result.series) == 1
    np.testing.assert_array_equal(result.series[0].hu, valid.sorted_hu)


# --- files that are not CT images ---------------------------------------------------------------

def test_non_dicom_files_are_errors_and_the_series_still_loads(tmp_path, valid):
    junk = tmp_path / "in" / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello, this is not DICOM\n" * 20)
    (junk / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (junk / "empty").write_bytes(b"")
    (junk / "random.bin").write_bytes(np.random.default_rng(0).bytes(5000))
    (junk / "bare-group-8.bin").write_bytes(b"\x08\x00\x05\x00" + np.random.default_rng(1).bytes(3000))
    (junk / "old.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    errors = errors_by_name(result)
    for name in ("notes.txt", "image.png", "empty", "random.bin"):
        assert errors[name] == "is not a DICOM file"
    assert "damaged" in errors["bare-group-8.bin"] or "missing or invalid" in errors["bare-group-8.bin"]
    assert errors["old.tar.gz"] == "is a gzip archive; only zip archives are opened - extract it first"


@pytest.mark.parametrize(("spec", "message"), [
    (CTSeriesSpec(modality="MR", sop_class=MRImageStorage), "is MR, not CT; only CT series can be analysed"),
    (CTSeriesSpec(sop_class=SecondaryCaptureImageStorage),
     "is a 'Secondary Capture Image Storage', not a CT image (CT Image Storage)"),
    (CTSeriesSpec(sop_class=EnhancedCTImageStorage), "is an Enhanced CT multi-frame image, which is not supported"),
], ids=["mr", "secondary-capture", "enhanced-ct"])
def test_images_that_are_not_classic_ct(tmp_path, valid, spec, message):
    one_file(tmp_path / "in", spec)
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert errors_by_name(result)["one.dcm"].startswith(message)


@pytest.mark.parametrize(("sop_class", "modality", "name"), [
    (BasicTextSRStorage, "SR", "Basic Text SR Storage"),
    (GrayscaleSoftcopyPresentationStateStorage, "PR", "Grayscale Softcopy Presentation State Storage"),
])
def test_non_image_objects(tmp_path, valid, sop_class, modality, name):
    save(non_image_dataset(sop_class, modality), tmp_path / "in" / "object.dcm")
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert errors_by_name(result)["object.dcm"] == f"is not an image but a '{name}' object (modality {modality})"


def test_dicomdir_is_skipped_not_an_error(tmp_path, valid):
    ds = pydicom.Dataset()
    ds.FileSetID = "CD"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "in" / "DICOMDIR", enforce_file_format=True)
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert result.errors == []
    assert any("DICOMDIR index file" in s.error for s in result.skipped)


def test_deflated_transfer_syntax_is_refused(tmp_path, valid):
    ds = ct_dataset(CTSeriesSpec(), 0, np.zeros((64, 64), np.int16), 1)
    save(ds, tmp_path / "in" / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert "Deflated transfer syntax" in errors_by_name(result)["deflated.dcm"]


def test_transfer_syntax_without_a_decoder_is_refused_from_the_header(tmp_path, valid):
    ds = ct_dataset(CTSeriesSpec(), 0, np.zeros((64, 64), np.int16), 1)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)])
    ds["PixelData"].VR = "OB"
    save(ds, tmp_path / "in" / "video.dcm", MPEG2MPML)
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert errors_by_name(result)["video.dcm"] == ("uses transfer syntax 'MPEG2 Main Profile / Main Level', "
                                                   "which cannot be decoded")


# --- truncated and damaged files ----------------------------------------------------------------

def test_truncated_header_is_an_error(tmp_path, valid):
    source = valid.paths[0].read_bytes()
    (tmp_path / "in" / "cut.dcm").write_bytes(source[:400])
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert "truncated" in errors_by_name(result)["cut.dcm"] or "invalid" in errors_by_name(result)["cut.dcm"]


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, JPEGLSLossless])
def test_truncated_pixel_data_drops_the_slice_and_reports_the_gap(tmp_path, syntax):
    written = write_series(tmp_path / "in", CTSeriesSpec(transfer_syntax=syntax, n_slices=12))
    middle = written.paths[written.order[6]]
    middle.write_bytes(middle.read_bytes()[:-300])
    result = run(tmp_path, tmp_path / "in")
    assert [e.path for e in result.errors] == [str(middle)]
    assert "truncated" in result.errors[0].error
    series = result.series[0]
    assert series.n_slices == 11
    assert "1 slice could not be read (see errors)" in series.warnings
    assert any(w.startswith("gap of 4.0 mm between slices 6 and 7") for w in series.warnings)
    np.testing.assert_array_equal(series.hu, np.delete(written.sorted_hu, 6, axis=0))


def test_unreadable_best_series_falls_back_to_the_next(tmp_path):
    bone = write_series(tmp_path / "in" / "bone", CTSeriesSpec(series_number=3, description="Bone", kernel="BONE"))
    soft = write_series(tmp_path / "in" / "soft", CTSeriesSpec(series_number=2, description="Soft"))
    for path in bone.paths:
        path.write_bytes(path.read_bytes()[:-1000])
    result = run(tmp_path, tmp_path / "in")
    assert result.series[0].series_instance_uid == soft.spec.series_uid
    assert len(result.errors) == 10 and all("truncated pixel data" in e.error for e in result.errors)
    assert any(s.error.startswith("series 3 'Bone'") and "only 0 slices" in s.error for s in result.skipped)


def test_file_contradicting_its_transfer_syntax_still_reads(tmp_path):
    """Implicit VR data labelled Explicit VR: pydicom notices, and so must the fast pixel reader."""
    written = write_series(tmp_path / "in", CTSeriesSpec(transfer_syntax=pydicom.uid.ImplicitVRLittleEndian))
    for path in written.paths:
        data = path.read_bytes()
        body = data[144 + int.from_bytes(data[140:144], "little"):]  # after the file meta group
        meta = pydicom.dcmread(path).file_meta
        meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        fp = DicomBytesIO()
        write_file_meta_info(fp, meta)
        path.write_bytes(data[:132] + fp.getvalue() + body)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    result = run(tmp_path, tmp_path / "in")
    np.testing.assert_array_equal(result.series[0].hu, written.sorted_hu)


def fuzz_variants(folder: Path) -> tuple[list[bytes], list[bytes]]:
    """A native and a compressed one-slice file, cut everywhere, and with header bytes overwritten at random."""
    rng = np.random.default_rng(42)
    truncated, corrupted = [], []
    stored = np.arange(64 * 64, dtype=np.int16).reshape(64, 64)
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, JPEG2000Lossless):
        ds = ct_dataset(CTSeriesSpec(), 0, stored, 1)
        encode_pixels(ds, stored, syntax)
        data = save(ds, folder / "source.dcm", syntax).read_bytes()
        truncated += [data[:n] for n in np.linspace(1, len(data) - 1, 25).astype(int)]
        for _ in range(25):
            corrupt = bytearray(data)
            at = rng.integers(0, 1200, size=8)
            del corrupt[at[0]]  # a byte missing shifts every element after it
            for a in at[1:]:
                corrupt[a] = rng.integers(0, 256)
            corrupted.append(bytes(corrupt))
    return truncated, corrupted


def test_no_truncation_or_corruption_ever_raises_and_a_cut_file_is_never_used(tmp_path):
    truncated, corrupted = fuzz_variants(tmp_path)
    for i, data in enumerate(truncated + corrupted):
        folder = tmp_path / str(i)
        folder.mkdir()
        (folder / "f.dcm").write_bytes(data)
        result = run(folder, folder / "f.dcm", limits=IngestLimits(min_slices=1))
        assert result.series or result.errors
        if i < len(truncated):
            assert result.series == [] and result.errors, f"a file cut at {len(data)} bytes was used"


# --- sizes and memory ---------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "message"), [
    ({"Rows": 65535, "Columns": 65535}, "claims 65535 x 65535 pixels x 1 frame(s) x 16 bits (8.0 GiB)"),
    ({"NumberOfFrames": 100000}, "claims 64 x 64 pixels x 100000 frame(s) x 16 bits (781.2 MiB)"),
    ({"BitsAllocated": 32}, "has 32 bits per pixel"),
    ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "is a colour image (RGB)"),
], ids=["huge-rows-cols", "huge-frames", "32-bit", "rgb"])
def test_enormous_or_odd_image_headers_are_refused_before_decoding(tmp_path, valid, monkeypatch, changes,
                                                                   message):
    ds = ct_dataset(CTSeriesSpec(), 0, np.zeros((64, 64), np.int16), 1)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    bad = save(ds, tmp_path / "in" / "bad.dcm")
    decoded = []
    real_decode = app.ingest._decode_into
    monkeypatch.setattr(app.ingest, "_decode_into", lambda h, out: (decoded.append(h.file.path),
                                                                    real_decode(h, out)))
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert errors_by_name(result)["bad.dcm"].startswith(message)
    assert bad not in decoded and len(decoded) == 10


@pytest.mark.parametrize(("syntax", "size_marker", "offset"), [
    (JPEGLSLossless, b"\xff\xf7", 5),  # SOF55: length, precision, then rows and columns
    (JPEG2000Lossless, b"\xff\x51", 6),  # SIZ: length, capabilities, then Xsiz and Ysiz (4 bytes each)
])
def test_codestream_claiming_a_bigger_image_than_the_header_is_not_decoded(tmp_path, syntax, size_marker,
                                                                          offset):
    written = write_series(tmp_path / "in", CTSeriesSpec(transfer_syntax=syntax, n_slices=12))
    target = written.paths[written.order[-1]]
    data = bytearray(target.read_bytes())
    at = data.index(size_marker)
    width = 2 if syntax == JPEGLSLossless else 4
    for k in range(2):
        start = at + offset + k * width
        data[start:start + width] = (60000).to_bytes(width, "big")
    target.write_bytes(bytes(data))
    result = run(tmp_path, tmp_path / "in")
    assert result.series[0].n_slices == 11
    assert [e.path for e in result.errors] == [str(target)]
    assert result.errors[0].error == ("compressed image claims 60000 x 60000 pixels but the header says 64 x 64; "
                                      "not decoded")


def test_series_too_large_for_memory_is_rejected_before_decoding(tmp_path, valid, monkeypatch):
    monkeypatch.setattr(app.ingest, "_decode_into", lambda h, out: pytest.fail("decoded"))
    result = run(tmp_path, tmp_path / "in", limits=IngestLimits(max_volume_bytes=50_000))
    assert result.series == []
    assert "10 slices of 64 x 64 need 80.0 KiB, more than the 48.8 KiB limit" in result.errors[0].error


def test_file_and_folder_count_limits(tmp_path, valid):
    (tmp_path / "big.bin").write_bytes(bytes(2 * 1024 * 1024))
    result = run(tmp_path, tmp_path / "in", tmp_path / "big.bin", limits=IngestLimits(max_file_bytes=1024 * 1024))
    assert_valid_series_survives(result, valid)
    assert errors_by_name(result)["big.bin"] == "is 2.0 MiB, too large for one CT image (limit 1.0 MiB)"

    result = run(tmp_path, tmp_path / "in", limits=IngestLimits(max_files=5))
    assert result.series == []
    assert [e.error for e in result.errors] == ["contains more than 5 files; pass one study folder at a time"]


def test_missing_input_and_special_files(tmp_path, valid):
    os.mkfifo(tmp_path / "in" / "pipe")
    os.mkfifo(tmp_path / "pipe2")
    (tmp_path / "empty").mkdir()
    result = run(tmp_path, tmp_path / "in", tmp_path / "nowhere", tmp_path / "pipe2", tmp_path / "empty")
    assert_valid_series_survives(result, valid)
    errors = errors_by_name(result)
    assert errors["pipe"] == "is not a regular file (device, pipe or socket); skipped"
    assert errors["pipe2"] == "is not a regular file or folder (device, pipe or socket)"
    assert errors["nowhere"] == "does not exist or cannot be read"
    assert errors["empty"] == "contains no files"


# --- symbolic links -------------------------------------------------------------------------------

def test_symlinks_out_of_the_input_are_not_followed(tmp_path, valid):
    outside = write_series(tmp_path / "outside", CTSeriesSpec(study="secret", patient_id="TEST-0009"))
    (tmp_path / "in" / "link-to-dir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "in" / "link-to-file").symlink_to(outside.paths[0])
    (tmp_path / "in" / "link-to-etc").symlink_to("/etc/passwd")
    (tmp_path / "in" / "broken").symlink_to(tmp_path / "missing")
    (tmp_path / "in" / "alias").symlink_to(valid.paths[0])  # stays inside: harmless, read once
    result = run(tmp_path, tmp_path / "in")
    assert_valid_series_survives(result, valid)
    assert result.series[0].study_instance_uid == valid.spec.study_uid
    errors = errors_by_name(result)
    for name in ("link-to-dir", "link-to-file", "link-to-etc"):
        assert errors[name] == "is a symbolic link pointing outside the input folder; not followed"
    assert errors["broken"] == "is a broken symbolic link; skipped"
    assert "alias" not in errors and len(result.errors) == 4


# --- archives -------------------------------------------------------------------------------------

def tree(root: Path, skip: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_relative_to(skip)}


def test_zip_slip_members_are_refused_and_nothing_lands_outside_the_workdir(tmp_path, valid):
    payload = valid.paths[0].read_bytes()
    unsafe = ["../evil.dcm", "../../evil.dcm", "sub/../../evil.dcm", f"{tmp_path}/absolute-evil.dcm",
              "/etc/cron.d/evil", "..\\evil-windows.dcm", "C:\\evil-drive.dcm"]
    members = {name: payload for name in unsafe}
    members.update({f"study/{p.name}": p.read_bytes() for p in valid.paths})
    archive = write_zip(tmp_path / "slip.zip", members)
    work = tmp_path / "work"
    before = tree(tmp_path, work)

    result = run(tmp_path, archive)

    assert len(result.series) == 1 and result.series[0].n_slices == 10
    assert sorted(e.path.split("!", 1)[1] for e in result.errors) == sorted(unsafe)
    assert {e.error for e in result.errors} == {"archive member has an unsafe path (absolute or '..'); not extracted"}
    assert tree(tmp_path, work) == before  # nothing new anywhere outside the workdir
    assert not (tmp_path / "absolute-evil.dcm").exists() and not Path("/etc/cron.d/evil").exists()
    assert not (tmp_path.parent / "evil.dcm").exists()
    extracted = [p for p in work.rglob("*") if p.is_file()]
    assert len(extracted) == 10 and all(p.resolve().is_relative_to(work.resolve()) for p in extracted)


def test_zip_bomb_by_declared_ratio(tmp_path, valid):
    members = {f"study/{p.name}": p.read_bytes() for p in valid.paths}
    members["bomb.bin"] = bytes(8 * 1024 * 1024)
    result = run(tmp_path, write_zip(tmp_path / "bomb.zip", members))
    assert len(result.series) == 1
    (error,) = result.errors
    assert error.path.endswith("bomb.zip!bomb.bin")
    assert "exceeds the 100:1 limit (possible zip bomb); not extracted" in error.error
    assert not any(p.stat().st_size > 100_000 for p in (tmp_path / "work").rglob("*") if p.is_file())


def test_zip_total_size_limit_counts_every_archive(tmp_path, valid):
    members = {f"study/{p.name}": p.read_bytes() for p in valid.paths}
    first = write_zip(tmp_path / "first.zip", members)
    second = write_zip(tmp_path / "second.zip", {f"again/{k}": v for k, v in members.items()})
    size = sum(len(v) for v in members.values())
    result = run(tmp_path, first, second, limits=IngestLimits(max_total_bytes=int(size * 1.5)))
    assert len(result.series) == 1
    (error,) = result.errors
    assert error.path == str(second) and "zip archive would expand to" in error.error


def test_zip_member_lying_about_its_size_is_stopped(tmp_path, valid):
    archive = write_zip(tmp_path / "liar.zip", {"liar.bin": bytes(3 * 1024 * 1024)})
    data = bytearray(archive.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 22:local + 26] = (1000).to_bytes(4, "little")  # uncompressed size, local header
    data[central + 24:central + 28] = (1000).to_bytes(4, "little")  # and central directory
    archive.write_bytes(bytes(data))
    result = run(tmp_path, archive)
    (error,) = result.errors
    assert "damaged" in error.error or "larger than its header declares" in error.error
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


def test_extraction_counts_bytes_whatever_the_zip_reader_returns(tmp_path, monkeypatch):
    """A reader that yields more than the member declares is cut off by the byte count."""
    archive = write_zip(tmp_path / "a.zip", {"a.bin": b"x" * 1000})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info: io.BytesIO(b"x" * 5_000_000))
    result = run(tmp_path, archive)
    (error,) = result.errors
    assert error.error == "archive member is larger than its header declares (possible zip bomb); not extracted"
    assert not any(p.is_file() for p in (tmp_path / "work").rglob("*"))


def test_nested_zip_is_reported_not_opened_and_a_zip_in_a_folder_is_opened(tmp_path, valid):
    inner = write_zip(tmp_path / "inner.zip", {f"study/{p.name}": p.read_bytes() for p in valid.paths})
    outer = write_zip(tmp_path / "outer.zip", {"inner.zip": inner.read_bytes()})
    result = run(tmp_path, outer)
    assert result.series == []
    (error,) = result.errors
    assert error.path == f"{outer}!inner.zip"
    assert error.error.startswith("is a zip archive inside a zip archive; not opened")

    folder = tmp_path / "folder"
    folder.mkdir()
    inner.rename(folder / "inner.zip")
    result = run(tmp_path, folder)
    assert_valid_series_survives(result, valid)


def test_encrypted_symlink_and_damaged_archives(tmp_path, valid):
    payload = valid.paths[0].read_bytes()
    encrypted = write_zip(tmp_path / "encrypted.zip", {"a.dcm": payload})
    data = bytearray(encrypted.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + flag_offset
        data[at] |= 0x01
    encrypted.write_bytes(bytes(data))

    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("evil-link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")

    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(write_zip(tmp_path / "x.zip", {"a.dcm": payload}).read_bytes()[:-30])
    bad_crc = write_zip(tmp_path / "crc.zip", {"a.dcm": payload}, compression=zipfile.ZIP_STORED)
    data = bytearray(bad_crc.read_bytes())
    data[data.index(b"DICM") + 10] ^= 0xFF
    bad_crc.write_bytes(bytes(data))

    result = run(tmp_path, encrypted, link, damaged, bad_crc)
    errors = {Path(e.path.split("!")[0]).name: e.error for e in result.errors}
    assert errors["encrypted.zip"] == "archive member is encrypted; extract it with its password first"
    assert errors["link.zip"] == "archive member is a symbolic link; not extracted"
    assert errors["damaged.zip"].startswith("is a damaged zip archive")
    assert errors["crc.zip"] == "archive member is damaged (bad checksum or truncated)"


def test_too_many_archive_entries(tmp_path):
    archive = write_zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(30)})
    result = run(tmp_path, archive, limits=IngestLimits(max_files=20))
    assert [e.error for e in result.errors] == [
        "zip archive has 30 entries, more than the 20 allowed; split it into one study per archive"]


# --- the process as a whole -----------------------------------------------------------------------

def test_no_traceback_and_no_patient_data_on_stderr(tmp_path, valid):
    """pydicom's own warnings quote element values: they must not reach the log while ingesting."""
    ds = ct_dataset(CTSeriesSpec(study="odd"), 0, np.zeros((64, 64), np.int16), 1)
    ds.PatientName = "Secret^Person" * 10  # too long for PN: pydicom would warn, quoting it
    ds.PatientID = "X" * 80
    save(ds, tmp_path / "in" / "odd.dcm")
    (tmp_path / "in" / "junk.txt").write_text("junk")
    code = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); from pathlib import Path; "
            "from app.ingest import ingest; r = ingest([sys.argv[1]], Path(sys.argv[2])); "
            "print(len(r.series), len(r.errors))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "in"), str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2"]  # the valid series; errors: junk.txt, the one-slice study
    assert "Traceback" not in proc.stderr and "Secret" not in proc.stderr and "XXXX" not in proc.stderr
