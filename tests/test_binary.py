"""Binary layers (sign, OneBit, BinaryMoS), packing, the 1-bit checkpoint and distillation."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from torch import nn

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.quant.binary import BinaryMoSLinear, OneBitLinear, SignLinear, SignSTE, rank1_abs
from squeezegen.quant.distill import DistillConfig, batch_rows, distill, schedule
from squeezegen.quant.packing import pack_signs, unpack_signs


def _linear(d_in: int, d_out: int, bias: bool = False, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out, bias=bias)


def test_sign_ste_forward_and_gradient_window():
    w = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.5], requires_grad=True)
    out = SignSTE.apply(w)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert w.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]  # passed only where |w| < 1


@pytest.mark.parametrize("rows,cols", [(3, 13), (5, 1), (7, 17), (2, 8), (4, 64)])
def test_packing_round_trip_on_odd_sizes(rows, cols):
    torch.manual_seed(rows * cols)
    w = torch.randn(rows, cols)
    w[0, 0] = 0.0  # zero counts as +1
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    signs = unpack_signs(packed, cols, torch.float32)
    assert torch.equal(signs, torch.where(w >= 0, 1.0, -1.0))


def test_packing_bit_order_by_hand():
    w = torch.tensor([[1.0, -1, -1, 1, -1, -1, -1, -1, 1]])  # column j -> bit j of byte j // 8
    assert pack_signs(w).tolist() == [[0b00001001, 0b00000001]]


def test_svd_init_reproduces_rank1_abs_weight():
    out_f, in_f = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 0.5, 2.0, 1.0])
    signs = torch.tensor([[1, -1, 1, 1], [-1, -1, 1, -1], [1, 1, -1, 1]], dtype=torch.float32)
    w = torch.outer(out_f, in_f) * signs
    out_scale, in_scale = rank1_abs(w)
    assert torch.allclose(torch.outer(out_scale, in_scale), w.abs(), atol=1e-5)
    assert (out_scale > 0).all() and (in_scale > 0).all()
    linear = nn.Linear(4, 3, bias=False)
    linear.weight.data = w
    mos = BinaryMoSLinear(linear, experts=3)
    for e in range(3):  # every expert starts at the same rank-1 factors
        assert torch.allclose(torch.outer(mos.out_scales[e], mos.in_scales[e]), w.abs(), atol=1e-5)
    # at init, with a rank-1 |W|, the binary layer reproduces the float layer exactly
    x = torch.randn(5, 4)
    assert torch.allclose(mos(x), linear(x), atol=1e-5)


def test_router_shapes_and_mixture():
    layer = BinaryMoSLinear(_linear(16, 24, bias=True), experts=4)
    x = torch.randn(2, 5, 16)
    gates = layer.gates(x)
    assert gates.shape == (2, 5, 4) and torch.allclose(gates.sum(-1), torch.ones(2, 5))
    assert layer.router.weight.shape == (4, 16)
    assert layer.in_scales.shape == (4, 16) and layer.out_scales.shape == (4, 24)
    with torch.no_grad():  # distinct experts: the output follows each token's own mixture
        layer.in_scales.mul_(torch.rand(4, 16) + 0.5)
        layer.out_scales.mul_(torch.rand(4, 24) + 0.5)
    y = layer(x)
    token = x[1, 3]
    g = torch.softmax(layer.router.weight @ token, dim=0)
    s_in, s_out = g @ layer.in_scales, g @ layer.out_scales
    signs = torch.where(layer.weight >= 0, 1.0, -1.0)
    assert torch.allclose(y[1, 3], (signs @ (token * s_in)) * s_out + layer.bias, atol=1e-5)
    assert y.shape == (2, 5, 24)


def test_one_expert_without_router_is_onebit_formula():
    linear = _linear(12, 10, bias=True)
    mos = BinaryMoSLinear(linear, experts=1)
    onebit = OneBitLinear(linear, layernorm=False)
    onebit.weight.data = mos.weight.data.clone()  # OneBit's latent starts at +-0.01: same signs
    x = torch.randn(3, 12)
    g, h = onebit.in_scale, onebit.out_scale
    by_hand = ((x * g) @ torch.where(linear.weight >= 0, 1.0, -1.0).T) * h + linear.bias
    assert torch.allclose(onebit(x), by_hand, atol=1e-5)
    assert torch.allclose(mos(x), by_hand, atol=1e-5)
    with_norm = OneBitLinear(linear)(x) - linear.bias  # LayerNorm without affine on the product
    assert torch.allclose(with_norm.mean(-1), torch.zeros(3), atol=1e-5)


def test_sign_layer_scale_is_mean_abs_per_output_row():
    linear = _linear(6, 4)
    layer = SignLinear(linear)
    assert torch.allclose(layer.out_scale, linear.weight.abs().mean(dim=1))
    x = torch.randn(2, 6)
    assert torch.allclose(layer(x), (x @ torch.sign(linear.weight).T) * layer.out_scale, atol=1e-6)


def test_binarize_replaces_block_linears_only():
    model, _ = sg.load("tiny-llama", dtype="float32")
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    sg.binarize_(model, sg.BinaryMoSConfig(experts=2))
    layers = model.model.layers
    binary = [m for m in model.modules() if isinstance(m, BinaryMoSLinear)]
    assert len(binary) == 7 * len(layers)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    with pytest.raises(SqueezegenError, match="already binarized"):
        sg.binarize_(model, sg.OneBitConfig())
    plain, _ = sg.load("tiny-llama", dtype="float32")
    with pytest.raises(SqueezegenError, match="binarize_"):
        sg.bits_per_weight(plain)


def test_bits_per_weight_by_hand():
    model, _ = sg.load("tiny-llama", dtype="float32")
    cfg = model.config
    sg.binarize_(model, sg.BinaryMoSConfig(experts=4))
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # (in, out)
    weights = sum(i * o for i, o in shapes)
    extra = sum(4 * (i + o) + 4 * i for i, o in shapes)  # scales (E x (in + out)) + router (E x in)
    assert sg.bits_per_weight(model) == pytest.approx((weights + 16 * extra) / weights)
    onebit, _ = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(onebit, sg.OneBitConfig())
    assert sg.bits_per_weight(onebit) == pytest.approx((weights + 16 * sum(i + o for i, o in shapes)) / weights)


def test_packed_forward_equals_unpacked_and_frees_latent_weights():
    model, _ = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(model, sg.BinaryMoSConfig())
    ids = torch.tensor([[1, 50, 7, 300, 9]])
    reference = copy.deepcopy(model)
    for p in reference.parameters():  # the deployed precision: 16-bit scales and other weights
        p.data = p.data.half().float()
    sg.pack_(model)
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight is None and q.packed.dtype == torch.uint8
    assert "weight" not in dict(q.named_parameters())
    assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("config", [sg.BinaryMoSConfig(experts=3), sg.OneBitConfig(), sg.SignConfig()])
def test_save_load_round_trip_identical_logits(tmp_path, config):
    model, tok = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(model, config)
    with torch.no_grad():  # trained-looking state: signs and scales away from their init
        for layer in model.modules():
            if hasattr(layer, "packed"):
                layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
    sg.pack_(model)
    ids = torch.tensor([[1, 50, 7, 300, 9, 11]])
    folder = sg.save(model, tok, tmp_path / "bin")
    loaded, tok2 = sg.load(folder, dtype="float32")
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    packed_bytes = sum(m.packed.numel() for m in loaded.modules() if getattr(m, "packed", None) is not None)
    assert packed_bytes == sum(m.in_features * m.out_features // 8 for m in loaded.modules() if hasattr(m, "packed"))


def test_save_never_overwrites_and_load_reports_corruption(tmp_path):
    model, tok = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(model, sg.OneBitConfig())
    folder = sg.save(model, tok, tmp_path / "bin")
    keep = (folder / "model.safetensors").read_bytes()
    with pytest.raises(SqueezegenError, match="not empty"):
        sg.save(model, tok, folder)
    assert (folder / "model.safetensors").read_bytes() == keep
    (folder / "model.safetensors").write_bytes(keep[: len(keep) // 2])
    with pytest.raises(SqueezegenError, match="corrupt"):
        sg.load(folder, dtype="float32")
    (folder / "model.safetensors").unlink()
    with pytest.raises(SqueezegenError, match="incomplete"):
        sg.load(folder, dtype="float32")


def _saved(tmp_path, name="bin", config=None):
    model, tok = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(model, config or sg.OneBitConfig())
    return model, tok, sg.save(model, tok, tmp_path / name)


def test_binary_folder_without_its_manifest_is_refused_not_randomised(tmp_path):
    _, _, folder = _saved(tmp_path)
    (folder / "squeezegen_binary.json").unlink()  # config.json still says squeezegen_binary
    with pytest.raises(SqueezegenError, match="squeezegen_binary.json is missing"):
        sg.load(folder, dtype="float32")


def test_corrupt_tensor_data_of_the_same_size_is_refused(tmp_path):
    model, _, folder = _saved(tmp_path)
    weights = folder / "model.safetensors"
    manifest = json.loads((folder / "squeezegen_binary.json").read_text())
    assert manifest["sha256"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    data = bytearray(weights.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_len])
    name = next(k for k in header if k.endswith("self_attn.q_proj.out_scale"))
    start = 8 + header_len + header[name]["data_offsets"][0]
    data[start : start + 2] = struct.pack("<e", float("nan"))  # one fp16 scale becomes NaN
    weights.write_bytes(bytes(data))
    with pytest.raises(SqueezegenError, match=r"corrupt binary checkpoint .*model\.safetensors: its sha256") as info:
        sg.load(folder, dtype="float32")
    assert "\n" not in str(info.value)


def test_overwrite_replaces_only_an_earlier_checkpoint(tmp_path, monkeypatch):
    from squeezegen.quant import checkpoint

    model, tok, folder = _saved(tmp_path)
    (folder / "binarize_report.json").write_text("{}")  # `squeezegen binarize` writes it alongside
    other = sg.binarize_(sg.load("tiny-llama", dtype="float32")[0], sg.SignConfig())
    sg.save(other, tok, folder, overwrite=True)
    assert sg.load(folder, dtype="float32")[0].config.squeezegen_binary["method"] == "sign"
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}

    def half_written(deployed, path):  # a full disk, a crash: the new write fails half-way
        open(path, "wb").write(b"half")
        raise OSError("no space left on device")

    monkeypatch.setattr(checkpoint, "save_model", half_written)
    with pytest.raises(OSError, match="no space"):
        sg.save(model, tok, folder, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept  # the old checkpoint as it was
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]  # nothing staged left behind

    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SqueezegenError, match="notes.txt"):
        sg.save(model, tok, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "notes.txt"} == kept
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(SqueezegenError, match="thesis.tex"):
        sg.save(model, tok, mine, overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_schedule_and_batches():
    assert schedule(0, 100, 4) == pytest.approx(0.25) and schedule(3, 100, 4) == pytest.approx(1.0)
    assert schedule(4, 100, 4) == pytest.approx(1.0) and schedule(100, 100, 4) == pytest.approx(0.0)
    assert schedule(52, 100, 4) == pytest.approx(0.5)
    # two ranks see disjoint blocks of one epoch; an epoch covers every block once
    seen = [batch_rows(s, 2, r, 2, 8, seed=0).tolist() for s in range(2) for r in range(2)]
    assert sorted(sum(seen, [])) == list(range(8))


def _student():
    teacher, tok = sg.load("tiny-llama", dtype="float32")
    student = sg.binarize_(copy.deepcopy(teacher), sg.BinaryMoSConfig(experts=2))
    torch.manual_seed(0)
    blocks = torch.randint(0, 1000, (6, 16))
    return teacher, student, blocks


def test_distillation_lowers_the_loss_and_trains_only_binary_layers(tmp_path):
    teacher, student, blocks = _student()
    embed = student.model.embed_tokens.weight.clone()
    config = DistillConfig(steps=12, batch=2, lr=2e-2, bf16="off", hidden_weight=1.0, save_every=100)
    history = distill(student, teacher, blocks[:2], config, tmp_path)
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert torch.equal(student.model.embed_tokens.weight, embed)
    assert (tmp_path / "checkpoint.pt").is_file()


class _Interrupted(nn.Module):
    """The teacher, failing on its third call: a run killed during step 3."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher, self.calls = teacher, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.teacher(*args, **kwargs)


def test_resume_continues_exactly(tmp_path):
    teacher, student, blocks = _student()
    config = DistillConfig(steps=4, batch=2, lr=1e-2, bf16="off", save_every=2)
    straight = copy.deepcopy(student)
    history = distill(straight, teacher, blocks, config, tmp_path / "a")
    with pytest.raises(SqueezegenError, match="nothing to resume"):
        distill(copy.deepcopy(student), teacher, blocks, config, tmp_path / "b", resume=True)
    with pytest.raises(KeyboardInterrupt):
        distill(student, _Interrupted(teacher), blocks, config, tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    fresh = sg.binarize_(copy.deepcopy(teacher), sg.BinaryMoSConfig(experts=2))  # a new process
    resumed = distill(fresh, teacher, blocks, config, tmp_path / "b", resume=True)
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in history])
    for (name, a), b in zip(straight.named_parameters(), fresh.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(SqueezegenError, match="other settings"):
        distill(fresh, teacher, blocks, DistillConfig(steps=5, bf16="off"), tmp_path / "b", resume=True)


def test_binarize_cli_distills_saves_and_refuses_to_overwrite(tmp_path):
    from squeezegen.cli import main

    out = tmp_path / "bin"
    args = ["binarize", "--model", "tiny-llama", "--steps", "2", "--batch", "1", "--block", "32", "--bf16", "off"]
    args += ["--eval-blocks", "2", "--decode-tokens", "4", "--out", str(out)]
    assert main(args) == 0
    model, _ = sg.load(out, dtype="float32")
    assert sg.bits_per_weight(model) > 1 and (out / "binarize_report.json").is_file()
    assert (tmp_path / "bin.ckpt" / "checkpoint.pt").is_file()
    assert main(args) == 2  # the saved model is kept
    table = tmp_path / "decode.md"
    bench = ["bench-binary", "--model", "tiny-llama", "--binary", str(out), "--tokens", "3", "--rounds", "1"]
    assert main([*bench, "--out", str(table)]) == 0
    rows = table.read_text().splitlines()
    assert rows[2].startswith("| tiny-llama |") and rows[2].endswith("| 1.00x |") and rows[3].startswith("| bin |")


def test_distillation_runs_under_torchrun_with_two_processes(tmp_path):
    out = tmp_path / "ddp"
    # --standalone: torchrun picks a free port itself, so two runs at once do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "squeezegen.cli", "binarize", "--model", "tiny-llama", "--steps", "2", "--batch", "1"]
    cmd += ["--block", "32", "--bf16", "off", "--eval-blocks", "2", "--decode-tokens", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = (out / "binarize_report.json").read_text()
    assert '"tokens": 128' in report  # 2 steps x 1 block x 32 tokens x 2 processes
    sg.load(out, dtype="float32")
