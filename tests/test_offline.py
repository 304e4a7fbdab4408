"""Offline use: image-only commands never load a tokenizer, a transformers directory brings its own, and a
download that cannot happen is one line naming the URL, the cache path and TIPSTORCH_OFFLINE."""

from __future__ import annotations

import shutil

import pytest
import torch

import tipstorch
from tests.helpers import tiny_config
from tipstorch.cli import main
from tipstorch.models.tips import TIPSModel
from tipstorch.models.tokenizer import OFFICIAL_TOKENIZER_URL, Tokenizer
from tipstorch.weights.cache import cached_path_for
from tipstorch.weights.factory import get_tokenizer, scenes_tokenizer_path
from tipstorch.weights.transformers import save_transformers

EXAMPLE = str(scenes_tokenizer_path().with_name("example_scene.png"))
UNREACHABLE = "http://127.0.0.1:9/tips/tokenizer.model"  # the discard port: connection refused


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIPSTORCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TIPSTORCH_OFFLINE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def official_tokenizer_model(tmp_path):
    """A checkpoint whose config names the official (downloaded) tokenizer."""
    torch.manual_seed(0)
    config = tiny_config(pos_grid=2, width=32, depth=1, text_depth=1)
    assert config.tokenizer == "official"
    return tipstorch.save_model(TIPSModel(config).eval(), tmp_path / "tiny.safetensors")


def _one_line_error(error: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(error.value.code)
    assert "\n" not in message and error.value.__suppress_context__
    for part in parts:
        assert part in message
    return message


def test_image_only_commands_run_offline_without_any_tokenizer(official_tokenizer_model, empty_cache, tmp_path,
                                                              monkeypatch):
    monkeypatch.setenv("TIPSTORCH_OFFLINE", "1")
    model = ["--model", str(official_tokenizer_model)]
    main(["encode", EXAMPLE, *model, "--out", str(tmp_path / "f.safetensors")])
    main(["pca", EXAMPLE, *model, "--out", str(tmp_path / "pca")])
    main(["convert", *model, "--to", "tipstorch", "--out", str(tmp_path / "copy.safetensors")])
    assert (tmp_path / "f.safetensors").exists() and (tmp_path / "copy.safetensors").exists()
    assert not empty_cache.exists()  # nothing was fetched, nothing was tried
    with pytest.raises(SystemExit) as error:  # a text command needs the tokenizer: one line, no traceback
        main(["classify", EXAMPLE, *model, "--labels", "circle,star"])
    _one_line_error(error, OFFICIAL_TOKENIZER_URL, str(cached_path_for(OFFICIAL_TOKENIZER_URL)), "TIPSTORCH_OFFLINE")


def test_unreachable_download_is_one_line_naming_url_cache_and_offline_mode(official_tokenizer_model, empty_cache):
    with pytest.raises(SystemExit) as error:
        main(["classify", EXAMPLE, "--model", str(official_tokenizer_model), "--labels", "circle,star",
              "--tokenizer", UNREACHABLE])
    _one_line_error(error, UNREACHABLE, str(cached_path_for(UNREACHABLE)), "TIPSTORCH_OFFLINE=1")


def _transformers_dir(tmp_path):
    torch.manual_seed(0)
    model = TIPSModel(tiny_config(pos_grid=2, width=32, depth=1, text_depth=1, scenes=True)).eval()
    directory = tmp_path / "tipsv2-tiny"
    save_transformers(model, directory)
    return directory


def test_transformers_directory_with_a_sentencepiece_model_uses_it_offline(tmp_path, empty_cache, monkeypatch, capsys):
    directory = _transformers_dir(tmp_path)
    shutil.copy(scenes_tokenizer_path(), directory / "tokenizer.model")
    model = tipstorch.load_model(directory)
    assert model.config.tokenizer == str(directory / "tokenizer.model")
    monkeypatch.setenv("TIPSTORCH_OFFLINE", "1")
    main(["classify", EXAMPLE, "--model", str(directory), "--labels", "circle,star"])
    assert "circle" in capsys.readouterr().out


def test_transformers_directory_with_the_tokenizer_json_transformers_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = tmp_path / "spm"
    source.mkdir()
    shutil.copy(scenes_tokenizer_path(), source / "tokenizer.model")
    directory = _transformers_dir(tmp_path)
    transformers.Tipsv2Tokenizer.from_pretrained(str(source)).save_pretrained(str(directory))
    assert (directory / "tokenizer.json").exists() and not (directory / "tokenizer.model").exists()
    tokenizer = get_tokenizer(tipstorch.load_model(directory))
    assert tokenizer.model_path == directory / "tokenizer.json"
    texts = ["a red circle left of a blue star", "Two GREEN squares", ""]
    assert torch.equal(tokenizer(texts), Tokenizer(scenes_tokenizer_path())(texts))
