"""Mobile SD: rewrites equal the modules they replace, exports match PyTorch, the GPU check, the
LiteRT pipeline, the schedulers against diffusers, and the CLI's errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from squeezegen.cli import main
from squeezegen.mobile import export as export_mod
from squeezegen.mobile import rewrites as rw
from squeezegen.mobile.check import check_tflite
from squeezegen.mobile.export import export_pipeline, load_manifest
from squeezegen.mobile.modules import MobileTimesteps, TextEncoder, UNetPart, VaeDecoder, plan_unet_parts, skip_count
from squeezegen.mobile.pipeline_config import SCHEDULER, build_pipeline, load_parts
from squeezegen.mobile.schedulers import make_scheduler


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_pipeline("tiny-sd", tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def parts(tiny_dir):
    return load_parts(tiny_dir)


@pytest.fixture(scope="session")
def exported(tiny_dir, tmp_path_factory):
    """tiny-sd exported once per recipe the tests need (fp32 ~30 s, int8 weight-only ~30 s)."""
    root = tmp_path_factory.mktemp("exports")
    return {r: (root / r, export_pipeline(tiny_dir, root / r, recipe=r)) for r in ("fp32", "int8-weight-only")}


def unet_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor([981.0, 1.0][:batch]),
        torch.randn(batch, 16, 32, generator=g),
    )


# ---- rewrites, each against the module it replaces ----


@pytest.mark.parametrize("shape", [(2, 32, 8, 8), (2, 32, 64), (1, 64, 4, 6)])
def test_group_norm_rewrite_matches(shape):
    torch.manual_seed(0)
    norm = nn.GroupNorm(8, shape[1], eps=1e-6)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(shape) * 30 + 5
    assert torch.allclose(rw.MobileGroupNorm(norm)(x), norm(x), atol=2e-5, rtol=1e-5)


def test_group_norm_rewrite_is_fp16_safe():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    x = torch.randn(1, 16, 32, 32) * 600  # (x - mean)^2 reaches ~1e6, past the FP16 maximum 65504
    naive_var = ((x.half() - x.half().mean()) ** 2).mean()
    assert not torch.isfinite(naive_var)  # what the rewrite avoids
    y16 = rw.MobileGroupNorm(copy_half(norm))(x.half()).float()
    assert torch.isfinite(y16).all()
    assert (y16 - norm(x)).abs().max() < 2e-2


def copy_half(module):
    import copy

    return copy.deepcopy(module).half()


def test_gelu_rewrite_matches_exact_and_tanh():
    x = torch.linspace(-60, 60, 20001)
    assert (rw.safe_gelu(x) - torch.nn.functional.gelu(x)).abs().max() < 1e-6
    assert (rw.safe_gelu(x, "tanh") - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() < 1e-5
    y16 = rw.safe_gelu(torch.tensor([-300.0, -5.0, 0.5, 300.0]).half(), "tanh")
    assert torch.isfinite(y16).all() and abs(y16[-1].item() - 300) < 0.5


def test_gelu_rewrite_replaces_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4), nn.GELU(approximate="tanh"))
    new = rw.apply_rewrites(model)
    assert isinstance(new[1], rw.SafeGELU) and new[3].approximate == "tanh" and isinstance(model[1], nn.GELU)
    x = torch.randn(16, 4) * 4
    assert torch.allclose(new(x), model(x), atol=1e-6)


def test_split_conv_and_linear_match():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 20, 3, padding=1)
    x = torch.randn(2, 8, 9, 7)
    assert torch.allclose(rw.SplitConv2d(conv, 3)(x), conv(x), atol=1e-6)
    lin = nn.Linear(16, 37)
    y = torch.randn(3, 5, 16)
    assert torch.allclose(rw.SplitLinear(lin, 4)(y), lin(y), atol=1e-6)


def test_rewrites_keep_unet_and_vae_outputs(parts):
    x, t, c = unet_inputs()
    ref = parts.unet(x, t, encoder_hidden_states=c).sample
    configs = {
        "attention": rw.RewriteConfig(group_norm=False, gelu=False, split=False),
        # scores in query blocks: 2 x 2 heads x 256 x 256 fp16 bytes over 64 KiB -> 8 blocks of 32 queries
        "attention_blocks": rw.RewriteConfig(group_norm=False, gelu=False, split=False, attention_bytes=2**16),
        "group_norm": rw.RewriteConfig(attention=False, gelu=False, split=False),
        "split": rw.RewriteConfig(attention=False, gelu=False, group_norm=False, split_threshold=2048),
        "all": rw.RewriteConfig(split_threshold=2048),
    }
    for name, cfg in configs.items():
        new = rw.apply_rewrites(parts.unet, cfg)
        assert (new(x, t, encoder_hidden_states=c).sample - ref).abs().max() < 1e-5, name
    counts = rw.count_replacements(rw.apply_rewrites(parts.unet, configs["all"]))
    assert counts["MobileGroupNorm"] > 0 and counts["SplitConv2d"] > 0 and counts["SplitLinear"] > 0
    z = torch.randn(1, 4, 16, 16)
    ref = parts.vae.decode(z / parts.vae.config.scaling_factor).sample
    assert (VaeDecoder(rw.apply_rewrites(parts.vae, configs["all"]))(z) - ref).abs().max() < 1e-5


def test_mobile_timesteps_match_diffusers(parts):
    t = torch.tensor([0.0, 1.0, 250.5, 999.0])
    assert torch.allclose(MobileTimesteps(parts.unet.time_proj)(t), parts.unet.time_proj(t), atol=1e-5)


@pytest.mark.parametrize("n_parts", [1, 2, 3])
def test_unet_in_parts_equals_unet(parts, n_parts):
    x, t, c = unet_inputs()
    ref = parts.unet(x, t, encoder_hidden_states=c).sample
    plan = plan_unet_parts(parts.unet, n_parts)
    assert len(plan) == n_parts
    h, tt, skips = x, t, []
    for start, stop in plan:
        out = UNetPart(parts.unet, start, stop, skip_count(parts.unet, start))(h, tt, c, *skips)
        if isinstance(out, tuple):
            h, tt, *skips = out
        else:
            h = out
    assert (h - ref).abs().max() < 1e-5


def test_text_encoder_view_matches_clip(parts):
    ids = torch.randint(0, 600, (2, 16))
    te = TextEncoder(parts.text_encoder, 16)
    assert torch.allclose(te(te.embed(ids)), parts.text_encoder(ids).last_hidden_state, atol=1e-5)


# ---- exported files against PyTorch ----


def _module_errors(folder, parts):
    from squeezegen.mobile.pipeline import LiteRTModules

    lite = LiteRTModules(folder)
    ids = np.random.default_rng(0).integers(0, 600, size=(1, 16))
    te = TextEncoder(parts.text_encoder, 16)
    with torch.no_grad():
        ref_te = te(te.embed(torch.tensor(ids))).numpy()
        x, t, c = unet_inputs()
        ref_unet = parts.unet(x, t, encoder_hidden_states=c).sample.numpy()
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        ref_vae = VaeDecoder(parts.vae)(z).numpy()
    return {
        "text_encoder": np.abs(lite.encode(ids) - ref_te).max(),
        "unet": np.abs(lite.unet(x.numpy(), t.numpy(), c.numpy()) - ref_unet).max(),
        "vae_decoder": np.abs(lite.decode(z.numpy()) - ref_vae).max(),
    }


def test_fp32_export_matches_pytorch(exported, parts):
    errors = _module_errors(exported["fp32"][0], parts)
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_int8_weight_only_export_matches_pytorch(exported, parts):
    errors = _module_errors(exported["int8-weight-only"][0], parts)
    assert all(e <= 5e-2 for e in errors.values()), errors
    fp32, int8 = exported["fp32"][1]["modules"], exported["int8-weight-only"][1]["modules"]
    assert int8["unet"]["bytes"] < fp32["unet"]["bytes"] / 2


def test_exports_have_no_broadcast_and_stay_on_gpu(exported, capsys):
    folder = exported["fp32"][0]
    files = [str(folder / f) for f in ("text_encoder.tflite", "unet.tflite", "vae_decoder.tflite")]
    for f in files:
        report = check_tflite(f, backend="static")
        assert report.ops["BROADCAST_TO"] == 0 and not report.off_gpu, (f, report.off_gpu)
    assert main(["mobile", "check", "--backend", "static", *files]) == 0


def test_check_reports_broadcast_when_group_norm_rewrite_is_off(tiny_dir, tmp_path, capsys):
    off = rw.RewriteConfig().disabled("group_norm")
    export_pipeline(tiny_dir, tmp_path, modules=("vae_decoder",), rewrites=off)
    report = check_tflite(tmp_path / "vae_decoder.tflite", backend="static")
    assert report.ops["BROADCAST_TO"] > 0 and not report.ok
    assert any(k.startswith("BROADCAST_TO") for k in report.off_gpu)
    with pytest.raises(SystemExit) as exc:
        main(["mobile", "check", "--backend", "static", str(tmp_path / "vae_decoder.tflite")])
    assert exc.value.code == 1
    assert "BROADCAST_TO" in capsys.readouterr().out


def test_manifest_round_trip(exported):
    folder, manifest = exported["fp32"]
    loaded = load_manifest(folder)
    assert loaded == json.loads(json.dumps(manifest))
    unet = loaded["modules"]["unet"]
    assert [i["shape"] for i in unet["inputs"]] == [[2, 4, 16, 16], [2], [2, 16, 32]]
    assert loaded["latent"] == {"channels": 4, "height": 16, "width": 16}
    assert loaded["scheduler"] == SCHEDULER and "tokenizer/vocab.json" in loaded["tokenizer"]
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (folder / f"{name}.tflite").stat().st_size == loaded["modules"][name]["bytes"]


def test_litert_pipeline_writes_png(exported, tmp_path, capsys):
    from PIL import Image

    folder = exported["fp32"][0]
    out = tmp_path / "cat.png"
    argv = ["mobile", "generate", "--model", str(folder), "--prompt", "a photo of a cat", "--steps", "3"]
    assert main([*argv, "--out", str(out), "--seed", "3"]) == 0
    assert Image.open(out).size == (32, 32)
    assert main([*argv, "--out", str(tmp_path / "again.png"), "--seed", "3"]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))


# ---- exports never overwrite silently, and a file cut short is named ----


def _copy_export(exported, tmp_path):
    return shutil.copytree(exported["fp32"][0], tmp_path / "export")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _staging_left(tmp_path):
    return [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def _refuse_work(*_args, **_kwargs):
    raise AssertionError("slow work started before the refusal")


def test_export_refuses_non_empty_out_before_any_work(exported, tmp_path, capsys, monkeypatch):
    out = _copy_export(exported, tmp_path)
    before = _files(out)
    monkeypatch.setattr(export_mod, "resolve_model", _refuse_work)
    argv = ["mobile", "export", "--model", "tiny-sd", "--modules", "text_encoder"]
    assert main([*argv, "--out", str(out)]) == 2
    (line,) = _error_line(capsys)
    assert "is not empty" in line and "--overwrite" in line
    assert _files(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(mine), "--overwrite"]) == 2  # not an export: nothing there to replace
    assert "no manifest.json" in _error_line(capsys)[0] and (mine / "notes.txt").read_text() == "mine"


def test_export_overwrite_merges_modules_and_keeps_user_files(exported, tiny_dir, parts, tmp_path, capsys):
    out = _copy_export(exported, tmp_path)
    (out / "notes.txt").write_text("mine")
    earlier = json.loads((out / "manifest.json").read_text())
    # an earlier layout wrote the text encoder under another name (as --unet-parts changes the UNet's files)
    (out / "text_encoder.tflite").rename(out / "text_encoder_v0.tflite")
    earlier["modules"]["text_encoder"]["file"] = "text_encoder_v0.tflite"
    (out / "manifest.json").write_text(json.dumps(earlier))
    argv = ["mobile", "export", "--model", str(tiny_dir), "--out", str(out), "--modules", "text_encoder"]
    assert main([*argv, "--overwrite"]) == 0
    assert "kept from the earlier export" in capsys.readouterr().out
    merged = load_manifest(out)
    assert list(merged["modules"]) == ["text_encoder", "unet", "vae_decoder"]
    assert merged["modules"]["unet"] == earlier["modules"]["unet"]
    assert merged["modules"]["vae_decoder"] == earlier["modules"]["vae_decoder"]
    assert merged["modules"]["text_encoder"]["file"] == "text_encoder.tflite"
    assert (out / "notes.txt").read_text() == "mine" and not (out / "text_encoder_v0.tflite").exists()
    assert not _staging_left(tmp_path)
    errors = _module_errors(out, parts)  # the merged folder is a whole, working export
    assert all(e <= 1e-4 for e in errors.values()), errors


def test_export_overwrite_refuses_mismatched_settings(exported, tiny_dir, tmp_path, capsys, monkeypatch):
    out = _copy_export(exported, tmp_path)
    before = _files(out)
    monkeypatch.setattr(export_mod, "convert_module", _refuse_work)
    argv = ["mobile", "export", "--model", str(tiny_dir), "--out", str(out), "--modules", "vae_decoder"]
    assert main([*argv, "--recipe", "int8-weight-only", "--overwrite"]) == 2
    (line,) = _error_line(capsys)
    assert "recipe ('fp32' there, 'int8-weight-only' now)" in line and "drop --modules" in line
    assert _files(out) == before and not _staging_left(tmp_path)


def test_interrupted_export_leaves_no_half_folder(exported, tiny_dir, tmp_path, monkeypatch):
    out = _copy_export(exported, tmp_path)
    before = _files(out)

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "convert_module", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(tiny_dir, out, modules=("text_encoder",), overwrite=True)
    assert _files(out) == before
    with pytest.raises(KeyboardInterrupt):
        export_pipeline(tiny_dir, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not _staging_left(tmp_path)


def test_check_json_refuses_existing_file(exported, tmp_path, capsys):
    model = str(exported["fp32"][0] / "text_encoder.tflite")
    report = tmp_path / "ops.json"
    report.write_text("mine")
    argv = ["mobile", "check", "--backend", "static", model, "--json", str(report)]
    assert main(argv) == 2
    (line,) = _error_line(capsys)
    assert str(report) in line and "--overwrite" in line and report.read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(report.read_text())[0]["path"] == model


@pytest.mark.parametrize("keep", ["half", 1000])
def test_check_rejects_truncated_tflite(exported, tmp_path, capsys, keep):
    # the int8 UNet keeps its weights after the op table, so half of it still lists every op
    whole = (exported["int8-weight-only"][0] / "unet.tflite").read_bytes()
    cut = tmp_path / "unet.tflite"
    cut.write_bytes(whole[: len(whole) // 2 if keep == "half" else keep])
    assert main(["mobile", "check", "--backend", "static", str(cut)]) == 2
    captured = capsys.readouterr()
    (line,) = [x for x in captured.err.splitlines() if x.startswith("squeezegen: error:")]
    assert str(cut) in line and "truncated" in line and "re-export" in line
    assert "ops," not in captured.out and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as exc:  # whole, it loads; its FC weights' DEQUANTIZE keeps it off the GPU
        main(["mobile", "check", "--backend", "static", str(exported["int8-weight-only"][0] / "unet.tflite")])
    assert exc.value.code == 1 and "int8 DEQUANTIZE of a FULLY_CONNECTED weight" in capsys.readouterr().out


def test_generate_rejects_truncated_module_files(exported, tmp_path, capsys):
    out = _copy_export(exported, tmp_path)
    argv = ["mobile", "generate", "--model", str(out), "--prompt", "a cat", "--steps", "1"]
    for name in ("unet.tflite", "text_encoder.tflite", "vae_decoder.tflite", "token_embedding.npy"):
        whole = (out / name).read_bytes()
        (out / name).write_bytes(whole[: len(whole) // 2])
        assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2, name
        (line,) = _error_line(capsys)
        assert str(out / name) in line and "truncated" in line, line
        (out / name).write_bytes(whole)
    assert main([*argv, "--out", str(tmp_path / "x.png")]) == 0


def test_eval_mini_refuses_earlier_exports_and_json(tmp_path, capsys):
    (tmp_path / "mini").mkdir()
    (tmp_path / "work" / "fp32").mkdir(parents=True)
    (tmp_path / "work" / "fp32" / "notes.txt").write_text("mine")
    argv = ["mobile", "eval-mini", "--model", str(tmp_path / "mini"), "--work", str(tmp_path / "work")]
    assert main([*argv, "--recipes", "fp32"]) == 2
    assert "is not empty" in _error_line(capsys)[0]
    (tmp_path / "eval.json").write_text("mine")
    assert main([*argv, "--recipes", "fp16", "--json", str(tmp_path / "eval.json")]) == 2
    assert "already exists" in _error_line(capsys)[0]


# ---- schedulers against diffusers ----


@pytest.mark.parametrize("name", ["euler", "dpm++"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_scheduler_matches_diffusers(name, spacing):
    import diffusers

    cls = {"euler": diffusers.EulerDiscreteScheduler, "dpm++": diffusers.DPMSolverMultistepScheduler}[name]
    cfg = {**SCHEDULER, "timestep_spacing": spacing}
    for steps in (1, 4, 20):
        ref = cls.from_config(cfg)
        ref.set_timesteps(steps)
        mine = make_scheduler(name, cfg, steps)
        assert np.allclose(ref.timesteps.numpy(), mine.timesteps)
        assert abs(float(ref.init_noise_sigma) - mine.init_noise_sigma) < 1e-4
        x = np.random.default_rng(steps).standard_normal((1, 4, 8, 8)).astype(np.float32) * mine.init_noise_sigma
        xt = torch.tensor(x)
        for i, t in enumerate(ref.timesteps):
            a = ref.scale_model_input(xt, t).numpy()
            assert np.abs(a - mine.scale_model_input(x, i)).max() < 1e-4
            eps = np.tanh(0.7 * a + i).astype(np.float32)  # any deterministic "model"
            xt = ref.step(torch.tensor(eps), t, xt).prev_sample
            x = mine.step(eps, i, x)
            assert np.abs(xt.numpy() - x).max() < 1e-4


# ---- CLI errors: one line, exit 2 ----


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return [line for line in err if line.startswith("squeezegen: error:")]


def test_cli_missing_folder(tmp_path, capsys):
    assert main(["mobile", "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    (line,) = _error_line(capsys)
    assert "does not exist" in line


def test_cli_non_sd_pipeline(tmp_path, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    assert main(["mobile", "export", "--model", str(folder), "--out", str(tmp_path / "o")]) == 2
    (line,) = _error_line(capsys)
    assert "FluxPipeline" in line and "Stable Diffusion" in line
    (tmp_path / "plain").mkdir()
    assert main(["mobile", "export", "--model", str(tmp_path / "plain"), "--out", str(tmp_path / "o")]) == 2
    assert "model_index.json" in _error_line(capsys)[0]


def test_cli_unknown_recipe(tmp_path, capsys):
    assert main(["mobile", "export", "--model", "tiny-sd", "--out", str(tmp_path), "--recipe", "int3"]) == 2
    (line,) = _error_line(capsys)
    assert "unknown recipe 'int3'" in line and "int8-weight-only" in line


def test_cli_export_refuses_a_tiny_attention_block(tmp_path, capsys):
    argv = ["mobile", "export", "--model", "tiny-sd", "--out", str(tmp_path / "o"), "--attention-bytes", "0"]
    assert main(argv) == 2
    (line,) = _error_line(capsys)
    assert "--attention-bytes 0" in line and "65536" in line and not (tmp_path / "o").exists()


def test_cli_generate_and_check_errors(tmp_path, capsys):
    assert main(["mobile", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "does not exist" in _error_line(capsys)[0]
    bogus = tmp_path / "x.tflite"
    bogus.write_bytes(b"not a model at all")
    assert main(["mobile", "check", str(bogus)]) == 2
    assert "not a .tflite" in _error_line(capsys)[0]


# ---- the miniature model's scoring path ----


def test_digit_features_score_real_digits():
    from squeezegen.mobile.miniature import digits, to_digit_features, train_classifier

    images, labels = digits()
    clf, held_out = train_classifier()
    assert held_out > 0.95
    assert (clf.predict(to_digit_features(images[:300])) == labels[:300]).mean() > 0.9


def test_manifest_keeps_input_order_past_ten_inputs(tmp_path):
    """UNet parts take (sample, temb, context, *skips): more than 10 inputs, named args_0..args_N."""
    from squeezegen.mobile import vulkan
    from squeezegen.mobile.accelerator import CompiledRunner
    from squeezegen.mobile.export import convert_module
    from squeezegen.mobile.pipeline import run_file

    class Weighted(nn.Module):
        def forward(self, *xs):
            return sum((i + 1) * x for i, x in enumerate(xs))

    xs = tuple(torch.full((1, 3), float(i)) for i in range(12))
    entry = convert_module(Weighted(), xs, tmp_path / "w.tflite", "fp32")
    assert [i["name"] for i in entry["inputs"]] == [f"args_{i}" for i in range(12)]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(tmp_path / "w.tflite")).get_signature_runner()
    want = Weighted()(*xs).numpy()
    assert np.allclose(run_file(runner, entry, *[x.numpy() for x in xs])[0], want)
    # the CompiledModel path (CPU and GPU accelerators) pairs names with buffers in the same order
    assert np.allclose(run_file(CompiledRunner(tmp_path / "w.tflite"), entry, *[x.numpy() for x in xs])[0], want)
    if vulkan.find_driver() is not None:
        gpu = CompiledRunner(tmp_path / "w.tflite", "gpu")
        assert np.allclose(run_file(gpu, entry, *[x.numpy() for x in xs])[0], want, rtol=2e-3)


# ---- LiteRT's GPU accelerator, executed (a software Vulkan driver where there is no GPU: make gpu-sw) ----


def _gpu_path():
    """Skip with the reason where no Vulkan driver exists; CI (SQUEEZEGEN_REQUIRE_VULKAN=1) fails instead."""
    import os

    from squeezegen.mobile import vulkan

    if vulkan.find_driver() is None:
        reason = f"no Vulkan driver for LiteRT's GPU accelerator: {vulkan.SETUP_HINT}"
        if os.environ.get("SQUEEZEGEN_REQUIRE_VULKAN") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def test_gpu_check_runs_exports_in_fp16_close_to_cpu(exported, tmp_path, capsys):
    _gpu_path()
    folder = exported["fp32"][0]
    report = tmp_path / "gpu.json"
    files = [str(folder / f) for f in ("text_encoder.tflite", "unet.tflite", "vae_decoder.tflite")]
    assert main(["mobile", "check", "--accelerator", "gpu", *files, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(report.read_text())
    for row in rows:
        assert row["runs_on_gpu"] and row["finite"] and row["inputs"] == "pipeline", row
        # fp16 rounds: not bit-equal to the CPU's fp32, but within the tolerance
        assert 0 < row["rel_error"] < 0.02 and row["adapter"] in out, row
    assert len(out.strip().splitlines()) == 3 and "INFO:" not in out


def test_gpu_check_rejects_what_the_gpu_rejects(exported, capsys):
    """int8 weight-only: DEQUANTIZE of FULLY_CONNECTED weights is refused by the GPU accelerator (and now
    by the static table too); exit 1 with the accelerator's own reason."""
    _gpu_path()
    path = str(exported["int8-weight-only"][0] / "text_encoder.tflite")
    with pytest.raises(SystemExit) as exc:
        main(["mobile", "check", "--accelerator", "gpu", path])
    assert exc.value.code == 1
    line = capsys.readouterr().out.strip()
    assert "does not run on the GPU alone" in line and "Shape mismatch" in line and "static table: 1 ops" not in line


def test_gpu_check_finds_fp16_overflow(tmp_path, capsys):
    """Activations past fp16's 65504 turn to inf on the GPU: non-finite, exit 1 (the CPU's fp32 is finite)."""
    _gpu_path()
    from squeezegen.mobile.export import convert_module

    class Overflow(nn.Module):
        def forward(self, x):
            return torch.tanh((x * 300.0) ** 2 / 1e3) + x * 300.0 * 300.0

    convert_module(Overflow(), (torch.zeros(1, 8, 4, 4),), tmp_path / "overflow.tflite", "fp32")
    with pytest.raises(SystemExit) as exc:
        main(["mobile", "check", "--accelerator", "gpu", str(tmp_path / "overflow.tflite")])
    assert exc.value.code == 1
    assert "non-finite" in capsys.readouterr().out


def test_text_attention_rewrite_is_what_keeps_the_text_encoder_right_on_the_gpu(tiny_dir, tmp_path):
    """Without MobileTextAttention, CLIP's ADDed causal mask computes wrong probabilities on the GPU
    (fp32 too); with it, the same text encoder matches the CPU."""
    _gpu_path()
    from squeezegen.mobile.accelerator import check_on_gpu

    errors = {}
    for name, config in (("on", rw.RewriteConfig()), ("off", rw.RewriteConfig().disabled("attention"))):
        export_pipeline(tiny_dir, tmp_path / name, modules=("text_encoder",), rewrites=config)
        errors[name] = check_on_gpu(tmp_path / name / "text_encoder.tflite")
    assert errors["on"].ok and errors["on"].rel_error < 0.01
    assert not errors["off"].ok and errors["off"].rel_error > 0.05


def test_generate_on_gpu_is_close_to_cpu(exported, tmp_path, capsys):
    _gpu_path()
    from PIL import Image

    from squeezegen.mobile.accelerator import CompiledRunner

    folder = exported["fp32"][0]
    adapter = CompiledRunner(folder / "vae_decoder.tflite", "gpu").adapter
    images = {}
    for accelerator, where in (("cpu", "cpu"), ("gpu", adapter)):
        path = tmp_path / f"{accelerator}.png"
        argv = ["mobile", "generate", "--model", str(folder), "--prompt", "a red bird", "--steps", "3"]
        assert main([*argv, "--accelerator", accelerator, "--out", str(path)]) == 0
        assert capsys.readouterr().err.strip().endswith(f"on {where}")  # the timing line names the adapter
        images[accelerator] = np.asarray(Image.open(path), dtype=np.float64)
    diff = np.abs(images["gpu"] - images["cpu"]).mean()
    assert diff < 2.0 and images["gpu"].std() > 5  # a few 0-255 levels of fp16 rounding, not a blank image


def test_gpu_check_without_driver_says_how_to_get_one(exported, monkeypatch, capsys):
    from squeezegen.mobile import vulkan

    monkeypatch.setattr(vulkan, "find_driver", lambda: None)
    assert main(["mobile", "check", "--accelerator", "gpu", str(exported["fp32"][0] / "unet.tflite")]) == 2
    (line,) = _error_line(capsys)
    assert "no Vulkan driver" in line and "make gpu-sw" in line


def test_module_files_of_a_unet_in_parts():
    """A UNet in parts lists `files` and no `file` (the CLI printed a KeyError after such an export)."""
    from squeezegen.mobile.export import module_files

    assert module_files({"files": ["unet_part0.tflite", "unet_part1.tflite"], "parts": []}) == [
        "unet_part0.tflite",
        "unet_part1.tflite",
    ]
    assert module_files({"file": "vae_decoder.tflite"}) == ["vae_decoder.tflite"]


def test_an_input_handed_on_as_an_output_comes_back(tmp_path):
    """A UNet part returns temb and earlier skips unchanged; LiteRT's CompiledModel never writes such an
    output (garbage on the CPU, zeros on the GPU), so the runner gives the input back."""
    from squeezegen.mobile import vulkan
    from squeezegen.mobile.accelerator import CompiledRunner
    from squeezegen.mobile.export import convert_module

    class HandOn(nn.Module):
        def forward(self, x, skip):
            return x * 2.0, skip

    x, skip = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    convert_module(HandOn(), (x, skip), tmp_path / "h.tflite", "fp32")
    for accelerator in ("cpu", "gpu") if vulkan.find_driver() is not None else ("cpu",):
        out = CompiledRunner(tmp_path / "h.tflite", accelerator)(args_0=x.numpy(), args_1=skip.numpy())
        assert np.array_equal(out["output_1"], skip.numpy()), accelerator
        assert np.allclose(out["output_0"], 2 * x.numpy(), rtol=1e-3), accelerator


def test_attention_in_query_blocks_stays_in_blocks_after_conversion(tmp_path):
    """Past `attention_bytes` no tensor of the exported attention holds the whole score matrix: the
    converter folds cat(softmax(s_i) V) back into one softmax over all scores, so blocks normalise
    after their product with V (SD 1.5's 64x64 attention needed a 512 MiB GPU buffer otherwise)."""
    from diffusers.models.attention_processor import Attention

    from squeezegen.mobile.check import op_census
    from squeezegen.mobile.export import convert_module

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    x = torch.randn(1, 256, 32)
    want = attn(x)
    attn.set_processor(rw.MobileAttnProcessor(max_bytes=2**14))  # scores 2 x 256 x 256 x 2 B = 256 KiB
    assert torch.allclose(attn(x), want, atol=1e-5)
    convert_module(attn, (x,), tmp_path / "attn.tflite", "fp32")
    largest = max(int(np.prod(t["shape"])) for op in op_census(tmp_path / "attn.tflite") for t in op["outputs"])
    assert largest * 2 <= 2**14
