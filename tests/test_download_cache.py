"""Downloads over loopback HTTP: cache, resume after a broken transfer, size and checksum checks,
offline mode, and ``create_model(pretrained=True)`` end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import threading

import numpy as np
import pytest
import torch

import tipstorch
from tests.helpers import tiny_config
from tests.official_reference import official_text_arrays, official_vision_arrays
from tipstorch.models import registry
from tipstorch.weights import cache


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with Range support; ``truncate`` cuts a response short once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.truncate: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server: FileServer = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path not in server.files:
            self.send_error(404)
            return
        body = server.files[self.path]
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.truncate.pop(self.path, None)
        self.wfile.write(body[start:cut] if cut is not None else body[start:])


@pytest.fixture
def server():
    payload = bytes(range(256)) * 4096  # 1 MiB
    instance = FileServer({"/data/file.bin": payload})
    thread = threading.Thread(target=instance.serve_forever, daemon=True)
    thread.start()
    yield instance
    instance.shutdown()
    instance.server_close()


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TIPSTORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TIPSTORCH_OFFLINE", raising=False)
    return tmp_path / "cache"


def test_download_stores_the_file_in_the_cache_once(server):
    url = server.base_url + "/data/file.bin"
    path = cache.download(url, progress=False)
    assert path.read_bytes() == server.files["/data/file.bin"]
    assert path == cache.cached_path_for(url)
    cache.download(url, progress=False)
    assert len(server.requests) == 1


def test_broken_transfer_is_an_error_and_the_next_call_resumes(server):
    url = server.base_url + "/data/file.bin"
    server.truncate["/data/file.bin"] = 300_000
    with pytest.raises(cache.DownloadError, match="resume"):
        cache.download(url, progress=False)
    assert not cache.cached_path_for(url).exists()
    path = cache.download(url, progress=False)
    assert path.read_bytes() == server.files["/data/file.bin"]
    assert server.requests[-1] == ("/data/file.bin", "bytes=300000-")


def test_expected_size_and_checksum_are_verified(server):
    url = server.base_url + "/data/file.bin"
    with pytest.raises(cache.DownloadError, match="expected size is 5 bytes"):
        cache.download(url, expected_size=5, progress=False)
    cache.cached_path_for(url).with_name("file.bin.part").unlink()
    with pytest.raises(cache.DownloadError, match="checksum mismatch"):
        cache.download(url, sha256="0" * 64, progress=False)
    good = hashlib.sha256(server.files["/data/file.bin"]).hexdigest()
    assert cache.download(url, sha256=good, progress=False).exists()


def test_missing_remote_file_and_offline_mode(server, monkeypatch):
    with pytest.raises(cache.DownloadError, match="HTTP 404"):
        cache.download(server.base_url + "/data/absent.bin", progress=False)
    monkeypatch.setenv("TIPSTORCH_OFFLINE", "1")
    with pytest.raises(cache.DownloadError, match="TIPSTORCH_OFFLINE"):
        cache.download(server.base_url + "/data/file.bin", progress=False)
    assert server.requests == [("/data/absent.bin", None)]


def test_create_model_pretrained_downloads_official_files(server, monkeypatch, tmp_path):
    """A registered model whose URLs point at the loopback server, as the real ones point at GCS."""
    config = tiny_config()
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, embed_dim=384, num_heads=6,
                                 mlp_hidden_dim=1536), text=dataclasses.replace(config.text, width=384, num_heads=6, mlp_dim=768))
    for name, arrays in (("t_vision.npz", official_vision_arrays(384, 2, 1536, 4, False)),
                         ("t_text.npz", official_text_arrays(384, 2, 768, 300, 0.02))):
        np.savez(tmp_path / name, **arrays)
        server.files[f"/ckpt/{name}"] = (tmp_path / name).read_bytes()
    spec = registry.ModelSpec("test-loopback", config, server.base_url + "/ckpt/t_vision.npz",
                              server.base_url + "/ckpt/t_text.npz", "test")
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    model = tipstorch.create_model("test-loopback", pretrained=True)
    assert not model.training
    expected = torch.from_numpy(official_vision_arrays(384, 2, 1536, 4, False)["blocks.1.attn.qkv.weight"])
    torch.testing.assert_close(model.visual.blocks[1].attn.qkv.weight, expected)
    assert model.temperature.item() == pytest.approx(0.02)
    also = tipstorch.load_model(server.base_url + "/ckpt/t_vision.npz")
    torch.testing.assert_close(also.visual.pos_embed, model.visual.pos_embed)


def test_random_only_model_refuses_pretrained():
    with pytest.raises(ValueError, match="has no official weights"):
        tipstorch.create_model("tips-tiny", pretrained=True)
    with pytest.raises(ValueError, match="unknown model 'tipsv3-b14'"):
        tipstorch.create_model("tipsv3-b14")
