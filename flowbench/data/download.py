"""Fetch, verify and safely extract the MAF data archive (Zenodo record 1161203, ``data.tar.gz``).

* Streaming download with ``requests``, a progress bar, HTTP Range resume into ``<archive>.part`` and retries
  with exponential backoff on connection errors and 5xx; fallback URLs tried in turn.
* Checksums: the archive's SHA-256 and MD5 are computed in one pass before anything is extracted. The MD5
  quoted for this archive by third-party loaders (:data:`REFERENCE_MD5`) could not be verified by us, so a
  mismatch says exactly that and tells how to accept a file with ``--md5``/``--sha256``.
* Safe extraction: every member is checked (no absolute paths, no ``..``, no links leaving the archive, no
  device files); only the expected files are written, into a temporary directory under the data root,
  and then each dataset folder is renamed into place. A failed run leaves the previous state intact.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tarfile
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable

from flowbench.data import cache, check_root, get_info, prepare_dataset
from flowbench.data.spec import DatasetSpec
from flowbench.errors import ConfigError, DataIntegrityError, DownloadError
from flowbench.utils import atomic_write_json

if TYPE_CHECKING:  # annotations only: requests is imported when a download starts
    import requests

ARCHIVE_NAME = "data.tar.gz"
DEFAULT_URLS: tuple[str, ...] = (
    "https://zenodo.org/records/1161203/files/data.tar.gz?download=1",
    "https://zenodo.org/record/1161203/files/data.tar.gz",
)
# Quoted by two third-party loaders; nobody on this project could confirm it against the file.
REFERENCE_MD5 = "9b9c9b0375315ad270eba4ce80c093ab"
ARCHIVE_TOP = "data"  # the archive's single top folder
MANIFEST = "download.json"

RETRIES = 4  # attempts per URL
BACKOFF_S = 1.0  # first wait; doubled after each failed attempt (tests set 0)
TIMEOUT_S = 30.0
CHUNK = 1 << 16  # a cut connection loses at most one chunk


@dataclass
class Checksums:
    sha256: str
    md5: str
    size: int
    verified_by: str = ""


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


class _NotFound(_Fatal):
    pass


def archive_members(specs: Iterable[DatasetSpec]) -> dict[str, str]:
    """Archive member name → path under the data root (``data/power/data.npy`` → ``power/data.npy``) for the
    raw files the datasets' specs declare."""
    return {f"{ARCHIVE_TOP}/{rel}": rel for s in specs for rel in s.raw_files}


def check_hex(value: str | None, algorithm: str) -> str | None:
    """``--sha256``/``--md5`` as lower-case hex, refused up front unless it has the digest's length."""
    if value is None:
        return None
    n = hashlib.new(algorithm).digest_size * 2
    v = value.strip().lower()
    if len(v) != n or any(c not in "0123456789abcdef" for c in v):
        label = {"sha256": "a SHA-256", "md5": "an MD5"}.get(algorithm, algorithm)
        raise ConfigError(
            f"--{algorithm} {value!r} is not {label} checksum: expected {n} hex digits, got {len(v)} "
            "characters" + ("" if len(v) != n else " that are not all hex digits")
        )
    return v


def check_archive(path: Path) -> Path:
    """``--from-archive PATH`` must name an existing regular file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--from-archive {path}: no such file")
    if path.is_dir():
        raise ConfigError(f"--from-archive {path} is a folder; give the data.tar.gz file itself")
    if not path.is_file():
        raise ConfigError(
            f"--from-archive {path} is not a regular file (a device, pipe or socket); give the data.tar.gz file itself"
        )
    return path


# --------------------------------------------------------------------------------------------- download
def fetch(urls: Iterable[str], dest: Path, *, retries: int | None = None, progress: bool = True) -> str:
    """Download to ``dest`` (resuming ``dest.part``); returns the URL that worked."""
    import requests

    retries = RETRIES if retries is None else retries
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures: list[str] = []
    not_found = False
    with requests.Session() as session:
        for url in urls:
            try:
                _fetch_one(session, url, dest, part, retries, progress)
                return url
            except _NotFound as e:
                not_found = True
                failures.append(f"  {url}: {e}")
            except (_Fatal, _Retryable) as e:
                failures.append(f"  {url}: {e}")
    offline = all("could not connect" in f for f in failures)
    if offline:
        hint = (
            "No network? Download data.tar.gz on a machine with internet (Zenodo record 1161203) and run "
            "`flowbench download --from-archive PATH`; or give a mirror with --url URL."
        )
    else:  # the server answered: the network is fine, so no "No network?"
        by_hand = "download data.tar.gz by hand (Zenodo record 1161203) and use --from-archive PATH"
        hint = f"Or {by_hand}." if not_found else f"Rerun to retry, give a mirror with --url URL, or {by_hand}."
    raise DownloadError(
        ("could not reach any source" if offline else "download failed")
        + ":\n"
        + "\n".join(failures)
        + f"\n{hint}"
        + (f"\nThe partial file {part} is kept; rerunning resumes it." if part.exists() else "")
    )


def _fetch_one(session: requests.Session, url: str, dest: Path, part: Path, retries: int, progress: bool) -> None:
    import requests

    last = "no attempt"
    for attempt in range(retries):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        # identity: byte counts and Range offsets must refer to the .tar.gz itself, never a re-encoding
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        connected = False
        try:
            with session.get(url, stream=True, headers=headers, timeout=TIMEOUT_S) as r:
                connected = True
                plan = _plan_write(r, have, part)
                if isinstance(plan, str):
                    last = plan
                    continue
                mode, have, total = plan
                if mode is None:  # .part already complete
                    os.replace(part, dest)
                    return
                if total is not None:
                    _check_space(part.parent, total - have)
                _stream(r, part, mode, have, total, progress)
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError,
        ) as e:
            last = f"connection cut ({_short(e)})" if connected else f"could not connect ({_short(e)})"
            continue
        got = part.stat().st_size
        if total is not None and got != total:
            last = f"connection cut at {got} of {total} bytes"
            continue
        os.replace(part, dest)
        return
    raise _Retryable(f"{last} (after {retries} attempts)")


def _plan_write(r: requests.Response, have: int, part: Path) -> str | tuple[str | None, int, int | None]:
    """How to write the body of ``r``, the answer to a request from byte ``have`` on: ``(mode, offset, total)``
    (mode None: ``part`` is complete already), or why to try again; raises where retrying cannot help."""
    if r.status_code == 416 and have:
        if _range_total(r.headers.get("Content-Range")) == have:
            return None, have, have
        part.unlink()  # our .part is not a prefix the server can continue
        return "HTTP 416 on resume; restarting from zero"
    if r.status_code in (404, 410):
        raise _NotFound(
            f"HTTP {r.status_code} {r.reason}: the archive is not at this URL (wrong URL, "
            "or the record moved: give a mirror with --url URL)"
        )
    if r.status_code >= 500:
        return f"HTTP {r.status_code} {r.reason}"
    if r.status_code not in (200, 206):
        raise _Fatal(f"HTTP {r.status_code} {r.reason}")
    if r.status_code == 206 and _range_start(r.headers.get("Content-Range")) != have:
        part.unlink(missing_ok=True)  # resumed at another offset: start again without Range
        return f"server answered Range {have}- with {r.headers.get('Content-Range')}"
    if r.status_code == 206:
        return "ab", have, _range_total(r.headers.get("Content-Range"))
    # full content (server ignored Range, or no .part yet)
    return "wb", 0, int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None


def _stream(r: requests.Response, part: Path, mode: str, have: int, total: int | None, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=have,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=ARCHIVE_NAME,
        disable=not progress or None,
    )
    try:
        with open(part, mode) as f:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DownloadError(
                f"disk full while writing {part}; free space or use --root on a larger disk "
                "(the archive is about 857 MB, extracted data a few GB). Rerunning resumes the .part file."
            ) from e
        raise
    finally:
        bar.close()


def _check_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DownloadError(
            f"not enough disk space in {folder}: need {need / 1e6:.0f} MB, {free / 1e6:.0f} MB free; "
            "free space or use --root on a larger disk"
        )


def _range_start(cr: str | None) -> int | None:
    try:  # "bytes 100-199/200"
        return int(cr.split()[1].split("-")[0]) if cr else None
    except (IndexError, ValueError):
        return None


def _range_total(cr: str | None) -> int | None:
    try:
        t = cr.rsplit("/", 1)[1] if cr else "*"
        return None if t == "*" else int(t)
    except (IndexError, ValueError):
        return None


def _short(e: BaseException) -> str:
    s = str(e)
    return s if len(s) < 160 else s[:157] + "..."


# --------------------------------------------------------------------------------------------- checksums
def checksums(path: Path) -> Checksums:
    sha, md5, size = hashlib.sha256(), hashlib.md5(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return Checksums(sha.hexdigest(), md5.hexdigest(), size)


def verify(path: Path, *, sha256: str | None = None, md5: str | None = None) -> Checksums:
    """Check the archive before extraction: against the user's ``sha256``/``md5``, else the reference MD5."""
    c = checksums(path)
    accept = f"if you trust this file, rerun with --sha256 {c.sha256} (or --md5 {c.md5})"
    if sha256:
        if c.sha256 != sha256.lower():
            raise DataIntegrityError(
                f"checksum mismatch for {path}: SHA-256 expected {sha256.lower()}, got {c.sha256}. "
                "The file is corrupt or not the expected one; rerun with --force to fetch it again"
            )
        c.verified_by = "sha256 (given by the user)"
    if md5:
        if c.md5 != md5.lower():
            raise DataIntegrityError(
                f"checksum mismatch for {path}: MD5 expected {md5.lower()}, got {c.md5}. "
                "The file is corrupt or not the expected one; rerun with --force to fetch it again"
            )
        c.verified_by = ", ".join(filter(None, [c.verified_by, "md5 (given by the user)"]))
    if not sha256 and not md5:
        if c.md5 != REFERENCE_MD5:
            raise DataIntegrityError(
                f"checksum mismatch for {path}: MD5 expected {REFERENCE_MD5}, got {c.md5} (SHA-256 {c.sha256}, "
                f"{c.size} bytes). Note: the expected MD5 is quoted by third-party loaders and is UNVERIFIED, so "
                "either the download is corrupt or the reference value is wrong. Compare with the checksum on "
                f"https://zenodo.org/records/1161203; {accept}; otherwise rerun with --force to fetch it again."
            )
        c.verified_by = "md5 (reference value quoted by third-party loaders, unverified)"
    return c


# --------------------------------------------------------------------------------------------- extraction
def check_member(m: tarfile.TarInfo) -> str:
    """The member's normalised name; refuses absolute paths, ``..``, escaping links and device files."""
    name = m.name
    while name.startswith("./"):
        name = name[2:]
    p = PurePosixPath(name)
    if name.startswith("/") or p.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise DataIntegrityError(f"unsafe archive: member {m.name!r} has an absolute path; refusing to extract")
    if ".." in p.parts:
        raise DataIntegrityError(f"unsafe archive: member {m.name!r} contains '..'; refusing to extract")
    if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
        raise DataIntegrityError(f"unsafe archive: member {m.name!r} is a device or FIFO; refusing to extract")
    if m.issym() or m.islnk():
        target = PurePosixPath(m.linkname)
        # symlinks resolve against the link's folder, hard links against the archive root
        base = p.parent if m.issym() else PurePosixPath()
        depth = 0
        for part in (base / target).parts if not target.is_absolute() else ("..",):
            depth += -1 if part == ".." else (0 if part == "." else 1)
            if depth < 0:
                raise DataIntegrityError(
                    f"unsafe archive: link {m.name!r} → {m.linkname!r} points outside the archive; refusing to extract"
                )
    return name


def extract(archive: Path, root: Path, members: dict[str, str]) -> dict[str, str]:
    """Extract ``members`` (archive name → root-relative path) into ``root`` via a temporary folder.

    Returns root-relative path → SHA-256 of each extracted file (hashed while it is written, not re-read).

    Every member of the archive is checked by :func:`check_member` (a single unsafe member rejects the
    archive). The wanted files must be regular files. Once all are extracted, each dataset's top folder
    (``power/``, ``BSDS300/`` …) replaces the previous one by rename.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        hashes: dict[str, str] = {}
        try:
            with tarfile.open(archive, "r|*") as tar:  # stream: one pass over the gzip data
                for m in tar:
                    name = check_member(m)
                    if name not in members:
                        continue
                    if not m.isfile():
                        raise DataIntegrityError(f"archive member {m.name!r} should be a regular file")
                    out = tmp / members[name]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src, sha = tar.extractfile(m), hashlib.sha256()
                    with open(out, "wb") as f:
                        while block := src.read(CHUNK):
                            sha.update(block)
                            f.write(block)
                    if out.stat().st_size != m.size:
                        raise DataIntegrityError(f"archive member {m.name!r} is truncated")
                    hashes[members[name]] = sha.hexdigest()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DownloadError(
                    f"disk full while extracting into {root}; free space or use --root elsewhere"
                ) from e
            raise DataIntegrityError(
                f"{archive} is truncated or not a valid tar.gz ({type(e).__name__}: {e}); nothing was changed. "
                "Rerun with --force to fetch it again (or check the file given to --from-archive)"
            ) from e
        missing = sorted(n for n, rel in members.items() if rel not in hashes)
        if missing:
            raise DataIntegrityError(f"{archive} lacks the expected member(s) {missing}; is it the MAF data.tar.gz?")
        _install(tmp, root, sorted({PurePosixPath(rel).parts[0] for rel in members.values()}))
        return dict(sorted(hashes.items()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, root: Path, folders: list[str]) -> None:
    """Rename each extracted folder into place; the old one is moved aside first and removed after."""
    for top in folders:
        new, dst = tmp / top, root / top
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{top}-", dir=root))
            os.replace(dst, old / top)
        os.replace(new, dst)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- orchestration
def _read_record(root: Path) -> dict:
    import json

    try:
        rec = json.loads((Path(root) / MANIFEST).read_text())
        return rec if isinstance(rec, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _raw_in_place(root: Path, raw_files: Iterable[str], record: dict, echo: Callable[[str], Any]) -> bool:
    """All raw files present and, where ``download.json`` recorded them, with the same SHA-256."""
    from flowbench.data.cache import sha256_file

    for rel in raw_files:
        path = Path(root) / rel
        if not path.is_file():
            return False
        want = record.get("files", {}).get(rel, {}).get("sha256")
        if want and sha256_file(path) != want:
            echo(f"{rel}: SHA-256 differs from the one recorded at extraction; extracting it again")
            return False
    return True


def download_and_prepare(
    root: Path,
    names: list[str],
    *,
    urls: Iterable[str] | None = None,
    from_archive: Path | None = None,
    force: bool = False,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    echo: Callable[[str], Any] = print,
) -> None:
    """Everything ``flowbench download`` does: check what is in place, fetch/verify/extract what is not,
    record checksums in ``ROOT/download.json`` and build the processed caches.

    A broken processed cache whose raw files are in place is rebuilt from them, without downloading.

    Raises:
        ConfigError: bad arguments (checksum format, ``--from-archive`` not a file, ``--url`` beside
            ``--from-archive``, a data root that is a file or cannot be created), checked before any network
            access. DownloadError, DataIntegrityError: as their names say.
    """
    urls = list(urls) if urls is not None else None
    if urls and from_archive is not None:
        raise ConfigError(
            "--url and --from-archive exclude each other: --from-archive reads a local archive and "
            "downloads nothing; give one of them"
        )
    sha256, md5 = check_hex(sha256, "sha256"), check_hex(md5, "md5")
    if from_archive is not None:
        from_archive = check_archive(from_archive)
    root = check_root(root)
    specs = _archive_specs([get_info(n) for n in names], root, echo)
    if not specs:
        return
    root = check_root(root, create=True)
    record = _read_record(root)
    todo = specs if force else [s for s in specs if not _raw_in_place(root, s.raw_files, record, echo)]
    if todo:
        archive, source, sha256 = _obtain_archive(root, record, from_archive, force, urls, sha256, md5, progress, echo)
        _extract_archive(archive, source, root, todo, record, sha256, md5, echo)
    _prepare_all(root, specs, todo, echo)


def _archive_specs(specs: list[DatasetSpec], root: Path, echo: Callable[[str], Any]) -> list[DatasetSpec]:
    """The datasets whose raw files come from the MAF archive; the others are named with where theirs come from."""
    for s in specs:
        if s.builtin:
            echo(f"{s.name}: built in ({s.source}), nothing to download")
        elif s.source != "archive":
            echo(f"{s.name}: not in the MAF archive (its source: {s.source}); put its raw files under {root} by hand")
    return [s for s in specs if not s.builtin and s.source == "archive"]


def _obtain_archive(
    root: Path,
    record: dict,
    from_archive: Path | None,
    force: bool,
    urls: list[str] | None,
    sha256: str | None,
    md5: str | None,
    progress: bool,
    echo: Callable[[str], Any],
) -> tuple[Path, str, str | None]:
    """``(archive, its source, the SHA-256 to verify it against)``: the given archive, the one an earlier run
    downloaded (and the SHA-256 that run accepted, when no checksum is given), or a fresh download."""
    if from_archive is not None:
        return from_archive, str(from_archive.resolve()), sha256
    archive = root / ".download" / ARCHIVE_NAME
    if force:
        archive.unlink(missing_ok=True)
        archive.with_name(archive.name + ".part").unlink(missing_ok=True)
    if archive.is_file():
        echo(f"using the archive downloaded earlier: {archive}")
        source = record.get("archive", {}).get("source", str(archive))
        if not sha256 and not md5 and record.get("archive", {}).get("sha256"):
            sha256 = record["archive"]["sha256"]  # accepted (and recorded) by an earlier run
        return archive, source, sha256
    echo(f"downloading {ARCHIVE_NAME} into {archive.parent} ...")
    return archive, fetch(urls or list(DEFAULT_URLS), archive, progress=progress), sha256


def _extract_archive(
    archive: Path,
    source: str,
    root: Path,
    todo: list[DatasetSpec],
    record: dict,
    sha256: str | None,
    md5: str | None,
    echo: Callable[[str], Any],
) -> None:
    """Verify the archive, extract the raw files of ``todo``, drop their processed caches and record the
    archive's and the files' checksums in ``ROOT/download.json``."""
    echo(f"verifying {archive} ...")
    c = verify(archive, sha256=sha256, md5=md5)
    echo(f"  sha256 {c.sha256}  md5 {c.md5}  ({c.verified_by})")
    members = archive_members(todo)
    echo(f"extracting {len(members)} file(s) into {root} ...")
    extracted = extract(archive, root, members)  # root-relative path -> SHA-256
    for s in todo:
        cache.remove(root, s.name)
    record["archive"] = {
        "name": ARCHIVE_NAME,
        "source": source,
        "sha256": c.sha256,
        "md5": c.md5,
        "size": c.size,
        "verified_by": c.verified_by,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files = record.setdefault("files", {})
    for rel, sha in extracted.items():
        files[rel] = {"sha256": sha, "size": (root / rel).stat().st_size}
    atomic_write_json(root / MANIFEST, record)


def _prepare_all(root: Path, specs: list[DatasetSpec], todo: list[DatasetSpec], echo: Callable[[str], Any]) -> None:
    """Build the processed cache of each dataset that lacks a sound one or whose raw files were just extracted."""
    rebuilt = False
    for s in specs:
        state = cache.check(root, s.name, s.recipe_version, s.classes)
        if state.kind == "ok" and s not in todo:
            echo(f"{s.name}: prepared (in place)")
            continue
        if state.kind == "broken" and s not in todo:
            echo(
                f"{s.name}: the processed cache in {cache.cache_dir(root, s.name)} is broken ({state.reason}); "
                "rebuilding it from the raw files (nothing to download)"
            )
            rebuilt = True
        t0 = time.perf_counter()
        ds = prepare_dataset(s.name, root)
        echo(
            f"{s.name}: prepared D={ds.dim} train/val/test = {len(ds.train)}/{len(ds.val)}/{len(ds.test)} "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    if not todo:
        echo(
            f"raw files in place under {root}: nothing downloaded"
            if rebuilt
            else f"everything in place under {root}: nothing downloaded"
        )
