"""Safe discovery of input files: folders, zip archives and single files.

Everything a user hands to the app passes through ``discover_inputs`` first. It
never follows a symbolic link that leaves the input folder, never writes
outside the caller's work directory and never expands more than the limits
allow. Each problem becomes an ``InputError`` the user can act on; nothing
here raises for a bad file.

Archives:
- zip archives are extracted into ``workdir`` (and nowhere else); a member with
  an absolute path or a ``..`` component ("zip slip") is refused;
- zip bombs are stopped three ways: the declared uncompressed sizes must fit the
  byte budget, each large member's declared compression ratio must stay under
  ``max_ratio``, and the bytes actually written are counted while extracting;
- an archive inside an archive is reported and not opened (depth limit 1); a
  zip found inside an input *folder* is opened like a top-level zip;
- encrypted members and symbolic-link members are reported and skipped.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

GiB = 1 << 30
MiB = 1 << 20

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
# Other archive formats get a precise message instead of "not a DICOM file".
_OTHER_ARCHIVES = ((b"\x1f\x8b", "gzip"), (b"7z\xbc\xaf\x27\x1c", "7-Zip"), (b"Rar!", "RAR"),
                   (b"BZh", "bzip2"), (b"\xfd7zXZ", "xz"))
# Declared ratios are only meaningful for members big enough to matter.
_RATIO_MIN_BYTES = MiB
_COPY_CHUNK = MiB


@dataclass(frozen=True)
class InputError:
    """One input that could not be used, and why (one line, no patient data)."""

    path: str
    error: str

    def __str__(self) -> str:
        return f"{self.path}: {self.error}"


@dataclass(frozen=True)
class IngestLimits:
    """Bounds that keep ingest fast and memory-safe on hostile input.

    File and archive limits are enforced here (discovery); image and series
    limits by ``app.ingest``.
    """

    max_files: int = 20_000  # per input folder or archive
    max_total_bytes: int = 4 * GiB  # all archive members extracted, declared and counted
    max_ratio: float = 100.0  # uncompressed / compressed size of one archive member
    max_file_bytes: int = 64 * MiB  # one single-frame CT image is at most 8 MiB
    max_rows: int = 2048
    max_cols: int = 2048
    max_slices: int = 2000
    min_slices: int = 8
    max_volume_bytes: int = GiB  # int16 HU of the chosen series (2000 x 512 x 512 fits)
    max_slice_spacing_mm: float = 10.0  # coarser series cannot show 5 mm lesions
    max_gap_mm: float = 15.0  # a longer hole in the stack rejects the series


@dataclass(frozen=True)
class InputFile:
    """A regular file to read: ``path`` on disk, ``display`` as the user knows it."""

    path: Path
    display: str


@dataclass
class Discovery:
    files: list[InputFile]
    errors: list[InputError]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def sniff(path: Path, n: int = 132) -> bytes:
    """The first ``n`` bytes of a file (fewer if it is shorter)."""
    with open(path, "rb") as fh:
        return fh.read(n)


def is_zip(head: bytes) -> bool:
    return head[:4] in ZIP_MAGIC


def other_archive_kind(head: bytes) -> str | None:
    """Name of a non-zip archive format recognised from the first bytes, else None."""
    for magic, name in _OTHER_ARCHIVES:
        if head.startswith(magic):
            return name
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


@dataclass
class _Budget:
    """Extraction bytes left for the whole ingest call."""

    limits: IngestLimits
    bytes_left: int


def discover_inputs(inputs: Sequence[str | os.PathLike], workdir: Path, limits: IngestLimits) -> Discovery:
    """Expand folders (recursively) and zip archives into a list of regular files to read.

    Zip members are extracted below ``workdir``. Files are returned in a
    deterministic order; duplicates (the same file reached twice) are dropped.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    found = Discovery(files=[], errors=[])
    budget = _Budget(limits, limits.max_total_bytes)
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        display = str(raw)
        try:
            st = path.stat()  # follows a symlink the user typed explicitly: their choice
        except OSError:
            found.errors.append(InputError(display, "does not exist or cannot be read"))
            continue
        if stat.S_ISDIR(st.st_mode):
            files, errors = _walk_folder(path, limits)
            found.errors.extend(errors)
        elif stat.S_ISREG(st.st_mode):
            files = [InputFile(path, display)]
        else:
            found.errors.append(InputError(display, "is not a regular file or folder (device, pipe or socket)"))
            continue
        for item in files:
            _add_file(item, found, seen, workdir, budget)
    return found


def _add_file(item: InputFile, found: Discovery, seen: set[Path], workdir: Path, budget: _Budget) -> None:
    real = item.path.resolve()
    if real in seen:
        return
    seen.add(real)
    try:
        head = sniff(item.path, 4)
    except OSError as exc:
        found.errors.append(InputError(item.display, f"cannot be read ({exc.strerror or 'I/O error'})"))
        return
    if is_zip(head):
        files, errors = _extract_zip(item, workdir, budget)
        found.files.extend(files)
        found.errors.extend(errors)
    else:
        found.files.append(item)


# Files operating systems leave next to the images (macOS resource forks, Finder and Explorer
# caches): passed over quietly instead of one "not a DICOM file" error per image.
_CLUTTER_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_CLUTTER_FOLDERS = frozenset({"__MACOSX"})


def _is_clutter(relpath: str) -> bool:
    parts = relpath.replace("\\", "/").split("/")
    name = parts[-1]
    return name in _CLUTTER_NAMES or name.startswith("._") or any(p in _CLUTTER_FOLDERS for p in parts[:-1])


def _walk_folder(root: Path, limits: IngestLimits) -> tuple[list[InputFile], list[InputError]]:
    """Regular files below ``root``; symlinks leaving ``root`` are reported, never followed."""
    root_real = root.resolve()
    files: list[InputFile] = []
    errors: list[InputError] = []
    def unreadable(exc: OSError) -> None:
        errors.append(InputError(str(exc.filename), f"folder cannot be read ({exc.strerror or 'I/O error'})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in _CLUTTER_FOLDERS)
        here = Path(dirpath)
        for name in dirnames + sorted(f for f in filenames if not _is_clutter(f)):
            full = here / name
            try:
                st = full.lstat()
            except OSError:
                errors.append(InputError(str(full), "cannot be read"))
                continue
            if stat.S_ISLNK(st.st_mode):
                problem = _link_problem(full, root_real)
                if problem:
                    errors.append(InputError(str(full), problem))
                # A link that stays inside the folder reaches a file the walk visits anyway.
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                errors.append(InputError(str(full), "is not a regular file (device, pipe or socket); skipped"))
                continue
            files.append(InputFile(full, str(full)))
            if len(files) > limits.max_files:
                return [], errors + [InputError(str(root), f"contains more than {limits.max_files} files; "
                                                           "pass one study folder at a time")]
    if not files and not errors:
        errors.append(InputError(str(root), "contains no files"))
    return files, errors


def _link_problem(link: Path, root_real: Path) -> str | None:
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping link
        return "is a broken symbolic link; skipped"
    if not target.is_relative_to(root_real):
        return "is a symbolic link pointing outside the input folder; not followed"
    return None


def _unsafe_member_name(name: str) -> bool:
    """True for absolute paths, drive letters and any '..' component (zip slip)."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\x00" in name:
        return True
    parts = name.replace("\\", "/").split("/")
    return any(part == ".." for part in parts)


def _member_relpath(name: str) -> Path:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return Path(*parts)


def _declared_entries(path: Path) -> int | None:
    """Entry count from the end-of-central-directory record, read before zipfile loads it all."""
    eocd_sig, z64_locator_sig = b"PK\x05\x06", b"PK\x06\x07"
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        tail_start = max(0, size - (22 + 65535))
        fh.seek(tail_start)
        tail = fh.read()
        at = tail.rfind(eocd_sig)
        if at < 0 or len(tail) < at + 22:
            return None
        entries = struct.unpack("<H", tail[at + 10:at + 12])[0]
        if entries != 0xFFFF or at < 20 or tail[at - 20:at - 16] != z64_locator_sig:
            return entries
        z64_offset = struct.unpack("<Q", tail[at - 12:at - 4])[0]
        fh.seek(z64_offset)
        record = fh.read(56)
        if len(record) < 40 or record[:4] != b"PK\x06\x06":
            return None
        return struct.unpack("<Q", record[32:40])[0]


def _extract_zip(archive: InputFile, workdir: Path, budget: _Budget) -> tuple[list[InputFile], list[InputError]]:
    limits = budget.limits
    label = archive.display
    try:
        entries = _declared_entries(archive.path)
    except OSError:
        entries = None
    if entries is None:
        return [], [InputError(label, "is a damaged zip archive (no central directory)")]
    if entries > limits.max_files:
        return [], [InputError(label, f"zip archive has {entries} entries, more than the {limits.max_files} "
                                      "allowed; split it into one study per archive")]
    try:
        zf = zipfile.ZipFile(archive.path)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError):
        return [], [InputError(label, "is a damaged zip archive")]
    with zf:
        # Windows tools may end a folder entry with a backslash, which is_dir() does not recognise.
        members = [info for info in zf.infolist()
                   if not info.is_dir() and not info.filename.endswith("\\") and not _is_clutter(info.filename)]
        declared = sum(info.file_size for info in members)
        if declared > budget.bytes_left:
            return [], [InputError(label, f"zip archive would expand to {format_bytes(declared)}, more than the "
                                          f"{format_bytes(budget.bytes_left)} left of the limit; "
                                          "pass fewer or smaller archives")]
        if not members:
            return [], [InputError(label, "zip archive is empty")]
        dest = Path(tempfile.mkdtemp(prefix="archive-", dir=workdir))
        files: list[InputFile] = []
        errors: list[InputError] = []
        for info in members:
            shown = f"{label}!{info.filename}"
            problem = _member_problem(info, limits)
            if problem:
                errors.append(InputError(shown, problem))
                continue
            target = dest / _member_relpath(info.filename)
            problem = _extract_member(zf, info, target, dest, budget)
            if problem:
                errors.append(InputError(shown, problem))
                continue
            if is_zip(sniff(target, 4)):
                target.unlink()
                errors.append(InputError(shown, "is a zip archive inside a zip archive; not opened - "
                                                "extract the outer archive and pass the inner one"))
                continue
            files.append(InputFile(target, shown))
    log.info("extracted %d of %d archive members", len(files), len(members))
    return files, errors


def _member_problem(info: zipfile.ZipInfo, limits: IngestLimits) -> str | None:
    if _unsafe_member_name(info.filename):
        return "archive member has an unsafe path (absolute or '..'); not extracted"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "archive member is a symbolic link; not extracted"
    if info.flag_bits & 0x1:
        return "archive member is encrypted; extract it with its password first"
    if info.file_size > _RATIO_MIN_BYTES:
        ratio = info.file_size / max(1, info.compress_size)
        if ratio > limits.max_ratio:
            return (f"archive member compression ratio {ratio:.0f}:1 exceeds the {limits.max_ratio:.0f}:1 limit "
                    "(possible zip bomb); not extracted")
    return None


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, dest: Path,
                    budget: _Budget) -> str | None:
    """Stream one member to ``target`` counting bytes; returns a problem or None.

    zipfile itself stops at the declared size (and then fails the CRC check); the
    count here keeps both limits true whatever the zip reader does.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        return "archive member's folder has the name of another member (a file); not extracted"
    except OSError as exc:
        return f"archive member could not be written ({exc.strerror or 'I/O error'})"
    try:
        if not target.parent.resolve().is_relative_to(dest.resolve()):  # defence in depth
            return "archive member has an unsafe path; not extracted"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return "archive member name appears twice; only the first copy was extracted"
    except OSError as exc:
        return f"archive member could not be written ({exc.strerror or 'I/O error'})"
    written = 0
    problem = None
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            while chunk := src.read(_COPY_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    problem = "archive member is larger than its header declares (possible zip bomb); not extracted"
                    break
                if written > budget.bytes_left:
                    problem = "extracting it would exceed the total size limit for archives; not extracted"
                    break
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        problem = _member_read_problem(exc)
    if problem:
        target.unlink(missing_ok=True)
        return problem
    budget.bytes_left -= written
    return None


def _member_read_problem(exc: Exception) -> str:
    if isinstance(exc, NotImplementedError):
        return "archive member uses an unsupported compression method; re-create the zip with deflate"
    if isinstance(exc, OSError) and not isinstance(exc, EOFError) and exc.errno is not None:
        return f"archive member could not be written ({exc.strerror})"
    return "archive member is damaged (bad checksum or truncated)"

