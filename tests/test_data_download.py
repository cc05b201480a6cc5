"""`flowbench download` against a real HTTP server on 127.0.0.1 serving a small archive in the real layout."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from flowbench import cli
from flowbench.data import DATASETS, download, load_dataset, status
from flowbench.data.download import download_and_prepare
from flowbench.errors import ConfigError, DataIntegrityError, DownloadError

RAW = Path(__file__).resolve().parent / "fixtures" / "raw"
#: The MAF archive's datasets and their fixture files (a fixture of another source, under raw/ too, is not an
#: archive member).
ARCHIVE_DATASETS = [name for name, spec in DATASETS.items() if spec.source == "archive"]
_FOLDERS = {Path(f).parts[0] for name in ARCHIVE_DATASETS for f in DATASETS[name].raw_files}
RAW_FILES = sorted(
    str(p.relative_to(RAW)) for p in RAW.rglob("*") if p.is_file() and p.relative_to(RAW).parts[0] in _FOLDERS
)


def make_archive(extra: list[tuple[tarfile.TarInfo, bytes | None]] = ()) -> bytes:
    """data.tar.gz in the MAF layout: data/<dataset>/<file>, plus an unrelated member (data/extras/)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in ["data"] + sorted({f"data/{Path(r).parts[0]}" for r in RAW_FILES}):
            tar.add(RAW if d == "data" else RAW / d[5:], arcname=d, recursive=False)
        for rel in RAW_FILES:
            tar.add(RAW / rel, arcname=f"data/{rel}")
        info = tarfile.TarInfo("data/extras/readme.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


ARCHIVE = make_archive()
SHA = hashlib.sha256(ARCHIVE).hexdigest()


class Server:
    """Serves ``files``; honours Range; can cut the first response short or fail with 503."""

    def __init__(self):
        self.files: dict[str, bytes] = {"/data.tar.gz": ARCHIVE}
        self.cut_once: set[str] = set()
        self.fail_503: dict[str, int] = {}
        self.ignore_range = False
        self.log: list[tuple[str, str | None]] = []
        srv = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                srv.log.append((path, self.headers.get("Range")))
                if srv.fail_503.get(path, 0) > 0:
                    srv.fail_503[path] -= 1
                    self.send_error(503)
                    return
                if path not in srv.files:
                    self.send_error(404)
                    return
                body, start = srv.files[path], 0
                rng = None if srv.ignore_range else self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in srv.cut_once:  # send half, then drop the connection
                    srv.cut_once.discard(path)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    monkeypatch.setattr(download, "TIMEOUT_S", 5.0)
    monkeypatch.setattr(download, "CHUNK", 4096)  # the fixture archive is ~50 kB: several chunks


def fetch_all(server: Server, root: Path, names=("power", "gas"), **kw):
    msgs: list[str] = []
    download_and_prepare(
        root,
        list(names),
        urls=kw.pop("urls", [server.url + "/data.tar.gz"]),
        sha256=kw.pop("sha256", SHA),
        progress=False,
        echo=msgs.append,
        **kw,
    )
    return msgs


def test_full_download_prepares_and_records(server: Server, tmp_path: Path):
    root = tmp_path / "data"
    names = ARCHIVE_DATASETS
    assert names == ["power", "gas", "hepmass", "miniboone", "bsds300", "mnist", "cifar10"]
    fetch_all(server, root, names)
    rec = json.loads((root / "download.json").read_text())
    assert rec["archive"]["sha256"] == SHA and rec["archive"]["verified_by"].startswith("sha256")
    assert set(rec["files"]) == set(RAW_FILES)
    for rel in RAW_FILES:
        assert (root / rel).read_bytes() == (RAW / rel).read_bytes()
        assert rec["files"][rel]["sha256"] == hashlib.sha256((RAW / rel).read_bytes()).hexdigest()
    assert not (root / "extras").exists()  # only the expected members
    assert not list(root.glob(".extract-*"))
    for n in names:
        assert (root / "processed" / n / "manifest.json").is_file()
    assert load_dataset("hepmass", root).train.shape == (27, 26)


def test_rerun_is_idempotent_and_offline(server: Server, tmp_path: Path):
    root = tmp_path / "data"
    fetch_all(server, root)
    n = len(server.log)
    msgs = fetch_all(server, root)
    assert len(server.log) == n  # no request at all
    assert any("everything in place" in m for m in msgs)
    # a raw file changed behind our back is detected and extracted again, from the kept archive
    (root / "power" / "data.npy").write_bytes(b"junk")
    msgs = fetch_all(server, root)
    assert len(server.log) == n and any("SHA-256 differs" in m for m in msgs)
    assert (root / "power" / "data.npy").read_bytes() == (RAW / "power" / "data.npy").read_bytes()


def test_resume_after_cut_connection(server: Server, tmp_path: Path):
    server.cut_once.add("/data.tar.gz")
    root = tmp_path / "data"
    fetch_all(server, root)
    assert server.log[0] == ("/data.tar.gz", None)
    # the second request resumes from what reached the .part file (whole chunks before the cut)
    path, rng = server.log[1]
    assert path == "/data.tar.gz" and rng.startswith("bytes=") and rng.endswith("-")
    assert 0 < int(rng[6:-1]) <= len(ARCHIVE) // 2 and len(server.log) == 2
    assert hashlib.sha256((root / ".download" / "data.tar.gz").read_bytes()).hexdigest() == SHA


def test_resume_from_existing_part_file(server: Server, tmp_path: Path):
    root = tmp_path / "data"
    (root / ".download").mkdir(parents=True)
    (root / ".download" / "data.tar.gz.part").write_bytes(ARCHIVE[:1000])
    fetch_all(server, root)
    assert server.log == [("/data.tar.gz", "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path):
    server.ignore_range = True
    root = tmp_path / "data"
    (root / ".download").mkdir(parents=True)
    (root / ".download" / "data.tar.gz.part").write_bytes(b"garbage!" * 100)
    fetch_all(server, root)  # 200 instead of 206: the .part is overwritten, the checksum passes
    assert server.log == [("/data.tar.gz", "bytes=800-")]


def test_disk_full_is_reported_before_writing(server: Server, tmp_path: Path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 100, 100))
    with pytest.raises(DownloadError, match=r"(?s)not enough disk space.*--root"):
        fetch_all(server, tmp_path / "data")


def test_5xx_is_retried_then_404_falls_back(server: Server, tmp_path: Path):
    server.fail_503["/data.tar.gz"] = 2
    fetch_all(server, tmp_path / "a", urls=[server.url + "/nothere", server.url + "/data.tar.gz"])
    assert [p for p, _ in server.log] == ["/nothere", "/data.tar.gz", "/data.tar.gz", "/data.tar.gz"]


def test_404_and_persistent_5xx_fail_with_the_fix(server: Server, tmp_path: Path):
    with pytest.raises(DownloadError, match=r"HTTP 404.*--url"):
        fetch_all(server, tmp_path / "a", urls=[server.url + "/nothere"])
    server.fail_503["/data.tar.gz"] = 99
    with pytest.raises(DownloadError, match=r"HTTP 503.*after 4 attempts"):
        fetch_all(server, tmp_path / "b")


def test_no_network_suggests_from_archive(tmp_path: Path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    with pytest.raises(DownloadError, match=r"(?s)could not reach any source.*--from-archive"):
        download_and_prepare(
            tmp_path, ["power"], urls=[f"http://127.0.0.1:{port}/data.tar.gz"], progress=False, echo=lambda m: None
        )


def test_checksum_mismatch_extracts_nothing(server: Server, tmp_path: Path):
    root = tmp_path / "data"
    with pytest.raises(DataIntegrityError, match=rf"SHA-256 expected {'0' * 64}, got {SHA}"):
        fetch_all(server, root, sha256="0" * 64)
    assert not (root / "power").exists()
    # without --sha256/--md5 the archive is compared with the reference MD5, which says it is unverified
    with pytest.raises(DataIntegrityError, match=r"UNVERIFIED.*--sha256 " + SHA):
        fetch_all(server, root, sha256=None)
    md5 = hashlib.md5(ARCHIVE).hexdigest()
    fetch_all(server, root, sha256=None, md5=md5)  # --md5 override accepts the (kept) archive
    assert (root / "power" / "data.npy").is_file()
    n = len(server.log)
    fetch_all(server, root, names=["miniboone"], sha256=None)  # later runs reuse the accepted archive
    assert len(server.log) == n and (root / "miniboone" / "data.npy").is_file()


def test_truncated_archive_leaves_previous_state(tmp_path: Path):
    root = tmp_path / "data"
    good = tmp_path / "good.tar.gz"
    good.write_bytes(ARCHIVE)
    download_and_prepare(root, ["power"], from_archive=good, sha256=SHA, progress=False, echo=lambda m: None)
    before = (root / "power" / "data.npy").read_bytes()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(ARCHIVE[: len(ARCHIVE) * 2 // 3])
    with pytest.raises(DataIntegrityError, match="truncated or not a valid tar.gz"):
        download_and_prepare(
            root,
            ["power", "mnist"],
            from_archive=bad,
            force=True,
            sha256=hashlib.sha256(bad.read_bytes()).hexdigest(),
            progress=False,
            echo=lambda m: None,
        )
    assert (root / "power" / "data.npy").read_bytes() == before
    assert not (root / "mnist").exists() and not list(root.glob(".extract-*"))


def test_cli_from_archive_with_repeated_dataset(tmp_path: Path, capsys):
    arc = tmp_path / "data.tar.gz"
    arc.write_bytes(ARCHIVE)
    root = tmp_path / "d"
    argv = [
        "download",
        "--root",
        str(root),
        "--from-archive",
        str(arc),
        "--sha256",
        SHA,
        "--dataset",
        "power",
        "--dataset",
        "miniboone",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "download.json",
        "miniboone",
        "power",
        "processed",
    ]
    assert cli.main(argv) == 0
    assert "everything in place" in capsys.readouterr().out
    assert cli.main(["download", "--root", str(root), "--dataset", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "download",
                "--root",
                str(root),
                "--from-archive",
                str(arc),
                "--sha256",
                "1" * 64,
                "--force",
                "--dataset",
                "power",
            ]
        )
        == 2
    )
    assert "checksum mismatch" in capsys.readouterr().err


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    payload = b"x" if kind == tarfile.REGTYPE else None
    info.size = len(payload or b"")
    return info, payload


@pytest.mark.parametrize(
    "member, why",
    [
        (_member("data/../../evil.txt"), "contains '..'"),
        (_member("/etc/evil.txt"), "absolute path"),
        (_member("data/power/link", tarfile.SYMTYPE, "../../../etc/passwd"), "points outside"),
        (_member("data/power/abs", tarfile.SYMTYPE, "/etc/passwd"), "points outside"),
        (_member("data/power/hard", tarfile.LNKTYPE, "../outside"), "points outside"),
        (_member("data/dev", tarfile.CHRTYPE), "device"),
    ],
)
def test_unsafe_archives_are_refused(tmp_path: Path, member, why):
    arc = tmp_path / "evil.tar.gz"
    arc.write_bytes(make_archive([member]))
    root = tmp_path / "data"
    with pytest.raises(DataIntegrityError, match=why):
        download_and_prepare(
            root,
            ["power"],
            from_archive=arc,
            sha256=hashlib.sha256(arc.read_bytes()).hexdigest(),
            progress=False,
            echo=lambda m: None,
        )
    assert not (root / "power").exists() and not (tmp_path / "evil.txt").exists()


def test_inside_symlink_is_tolerated(tmp_path: Path):
    arc = tmp_path / "ok.tar.gz"
    arc.write_bytes(make_archive([_member("data/extras/latest", tarfile.SYMTYPE, "readme.txt")]))
    download_and_prepare(
        tmp_path / "d",
        ["power"],
        from_archive=arc,
        sha256=hashlib.sha256(arc.read_bytes()).hexdigest(),
        progress=False,
        echo=lambda m: None,
    )
    assert (tmp_path / "d" / "power" / "data.npy").is_file()


def test_missing_member_is_reported(tmp_path: Path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(RAW / "power" / "data.npy", arcname="data/power/data.npy")
    arc = tmp_path / "partial.tar.gz"
    arc.write_bytes(buf.getvalue())
    with pytest.raises(DataIntegrityError, match=r"lacks the expected member.*data/gas/ethylene_CO.pickle"):
        download_and_prepare(
            tmp_path / "d",
            ["power", "gas"],
            from_archive=arc,
            sha256=hashlib.sha256(arc.read_bytes()).hexdigest(),
            progress=False,
            echo=lambda m: None,
        )
    assert not (tmp_path / "d" / "power").exists()


# ------------------------------------------------------------------------------ arguments checked up front
@pytest.mark.parametrize(
    "kw, why",
    [
        ({"sha256": "abc"}, r"--sha256 'abc' is not a SHA-256 checksum: expected 64 hex digits, got 3"),
        ({"sha256": "g" * 64}, r"not a SHA-256 checksum.*not all hex digits"),
        ({"sha256": None, "md5": SHA}, r"--md5 '[0-9a-f]{64}' is not an MD5 checksum: expected 32 hex digits, got 64"),
    ],
    ids=["sha256-short", "sha256-not-hex", "md5-wrong-length"],
)
def test_checksum_format_is_checked_before_any_download(server: Server, tmp_path: Path, kw: dict, why: str):
    with pytest.raises(ConfigError, match=why):
        fetch_all(server, tmp_path / "data", **kw)
    assert server.log == [] and not (tmp_path / "data").exists()


def test_from_archive_that_is_not_a_regular_file_says_what_it_is(tmp_path: Path, capsys):
    root = tmp_path / "d"
    for arc, why in (
        (tmp_path, "is a folder; give the data.tar.gz file itself"),
        (Path("/dev/null"), "is not a regular file (a device, pipe or socket)"),
        (tmp_path / "nope.tar.gz", "no such file"),
    ):
        assert cli.main(["download", "--root", str(root), "--from-archive", str(arc), "--dataset", "power"]) == 2
        assert why in capsys.readouterr().err
    assert not root.exists()


def test_url_beside_from_archive_is_refused(server: Server, tmp_path: Path, capsys):
    arc = tmp_path / "data.tar.gz"
    arc.write_bytes(ARCHIVE)
    argv = [
        "download",
        "--root",
        str(tmp_path / "d"),
        "--from-archive",
        str(arc),
        "--url",
        server.url + "/data.tar.gz",
        "--sha256",
        SHA,
        "--dataset",
        "power",
    ]
    assert cli.main(argv) == 2
    assert "--url and --from-archive exclude each other" in capsys.readouterr().err
    assert server.log == [] and not (tmp_path / "d").exists()


def test_404_says_not_found_not_no_network(server: Server, tmp_path: Path):
    with pytest.raises(DownloadError) as e:
        fetch_all(server, tmp_path / "a", urls=[server.url + "/nothere", server.url + "/gone"])
    msg = str(e.value)
    assert "No network" not in msg and "could not reach" not in msg
    assert msg.count("HTTP 404 Not Found: the archive is not at this URL") == 2 and "--url URL" in msg


def test_download_rebuilds_a_broken_cache_without_downloading(server: Server, tmp_path: Path):
    root = tmp_path / "data"
    fetch_all(server, root, ["power"])
    good = np.array(load_dataset("power", root).train)
    n = len(server.log)
    npy = root / "processed" / "power" / "train.npy"
    npy.write_bytes(npy.read_bytes()[:64])
    msgs = fetch_all(server, root, ["power"])
    assert len(server.log) == n  # nothing fetched
    assert any("broken (train.npy has 64 bytes" in m and "rebuilding it from the raw files" in m for m in msgs)
    assert msgs[-1].endswith("nothing downloaded") and status("power", root) == "prepared"
    np.testing.assert_array_equal(load_dataset("power", root).train, good)
