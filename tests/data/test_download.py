"""Downloads go through a local HTTP server or a mirror folder; nothing reaches the internet."""

from __future__ import annotations

import functools
import http.server
import stat
import sys
import threading

import pytest
from conftest import make_official

from cifarlab.data import cifar, download, load_dataset
from cifarlab.errors import DataError
from cifarlab.fsutil import umask


@pytest.fixture
def official_md5(monkeypatch):
    def set_(path):
        fmt = cifar.FORMATS["cifar10-python"]
        monkeypatch.setitem(cifar.FORMATS, "cifar10-python",
                            cifar.OfficialFormat(**{**fmt.__dict__, "md5": cifar.md5sum(path)}))

    return set_


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www over HTTP on 127.0.0.1 (a random free port)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()  # shutdown stops the loop; this closes the listening socket


def test_download_from_local_server_verified_and_cached(tmp_path, server, monkeypatch, official_md5):
    www, url = server
    path, truth = make_official(www, "cifar10-python")
    official_md5(path)
    monkeypatch.setenv("CIFARLAB_MIRROR", url)
    ds = load_dataset(None, "cifar10")
    assert ds.y_test.tolist() == truth["test_y"].tolist()
    cached = download.cache_dir() / "cifar-10-python.tar.gz"
    assert cached.is_file() and not list(cached.parent.glob("*.part"))
    if sys.platform != "win32":  # readable as a plain write would leave it, not private like its .part file
        assert stat.S_IMODE(cached.stat().st_mode) == 0o666 & ~umask()
    path.unlink()  # second load needs no server file
    assert load_dataset(None, "cifar10").x_train.shape == (50, 32, 32, 3)


def test_download_with_wrong_md5_is_discarded(server, monkeypatch):
    www, url = server
    make_official(www, "cifar10-python")
    monkeypatch.setenv("CIFARLAB_MIRROR", url)
    with pytest.raises(DataError, match="not the official c58f30108f718f92721af3b95e74349a; the download was discarded"):
        load_dataset(None, "cifar10")
    assert not list(download.cache_dir().glob("*cifar-10*"))


def test_mirror_folder(tmp_path, monkeypatch, official_md5):
    path, _ = make_official(tmp_path, "cifar10-python")
    official_md5(path)
    monkeypatch.setenv("CIFARLAB_MIRROR", str(tmp_path))
    assert load_dataset(None).kind == "cifar10-python"


def test_missing_file_on_server_and_closed_port(server, monkeypatch):
    _, url = server
    monkeypatch.setenv("CIFARLAB_MIRROR", url)
    with pytest.raises(DataError, match="could not download .*cifar-100-python.tar.gz.*--data PATH"):
        load_dataset(None, "cifar100")
    monkeypatch.setenv("CIFARLAB_MIRROR", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="could not download http://127.0.0.1:9/cifar-10-python.tar.gz"):
        load_dataset(None)
    assert not list(download.cache_dir().glob("*.part"))
