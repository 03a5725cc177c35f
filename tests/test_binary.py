"""Binary layers (sign, OneBit, BinaryMoS), packing, the 1-bit checkpoint and distillation."""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import struct
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.quant import kernels
from squeezegen.quant.binary import BinaryMoSLinear, OneBitLinear, SignLinear, SignSTE, rank1_abs
from squeezegen.quant.distill import DistillConfig, batch_rows, distill, distill_loss, schedule
from squeezegen.quant.packing import pack_signs, unpack_signs
from squeezegen.runtime import native


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


_LAYERS = {
    "sign": lambda linear: SignLinear(linear),
    "onebit": lambda linear: OneBitLinear(linear),
    "onebit-no-norm": lambda linear: OneBitLinear(linear, layernorm=False),
    "binarymos": lambda linear: BinaryMoSLinear(linear, experts=3),
}


def _packed_layer(kind: str, bias: bool, d_in: int = 44, d_out: int = 24) -> nn.Module:
    """A packed layer with trained-looking state: 44 inputs (not a multiple of 8), distinct experts."""
    layer = _LAYERS[kind](_linear(d_in, d_out, bias=bias, seed=3))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in layer.named_parameters():
            if name != "weight":  # scales, router and bias away from their init
                t.mul_(torch.rand_like(t) + 0.5)
    layer.pack_()
    return layer


def _dense(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer.scaled(x, layer.signs(x.dtype))
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.mark.parametrize("kind", list(_LAYERS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("shape", [(44, 24), (36, 22), (520, 515)])  # odd byte counts, partial row blocks, threads
def test_packed_kernel_equals_dense_path(kind, bias, dtype, tolerance, tokens, shape):
    assert native.runtime_library() is not None, "the packed kernel did not build: is a C compiler (gcc) installed?"
    layer = _packed_layer(kind, bias, *shape)
    x = torch.randn(1, tokens, shape[0]).to(dtype)
    with torch.no_grad():
        raw = kernels.binary_linear(x, layer.packed, layer.out_features, *layer.kernel_args())
        y, reference = layer(x), _dense(layer, x)
    assert raw is not None and torch.equal(raw, y)  # the forward went through the kernel
    assert y.dtype == dtype and y.shape == (1, tokens, shape[1])
    assert _relative_error(y, reference) <= tolerance


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_many_tokens_and_no_kernel_take_the_dense_path(kind, monkeypatch):
    layer = _packed_layer(kind, bias=True)
    args = (layer.packed, layer.out_features, *layer.kernel_args())
    with torch.no_grad():
        for many in (torch.randn(1, native.KERNEL_TOKENS + 1, 44), torch.randn(3, 6, 44)):  # 17, 18: a prefill
            assert kernels.binary_linear(many, *args) is None
            assert torch.equal(layer(many), _dense(layer, many))
        if native.runtime_library() is not None:  # 16 tokens still go through the kernel
            assert kernels.binary_linear(torch.randn(2, 8, 44), *args) is not None
        few = torch.randn(1, 3, 44)
        kernel = layer(few)
        monkeypatch.setattr(kernels, "runtime_library", lambda: None)  # no compiler on this machine
        assert kernels.binary_linear(few, *args) is None
        dense = layer(few)
    assert torch.equal(dense, _dense(layer, few))
    assert _relative_error(kernel, dense) <= 1e-5
    x = torch.randn(1, 2, 44, requires_grad=True)  # with gradients on, the dense path too
    assert torch.equal(layer(x), _dense(layer, x))


def _fake_outputs(seed: int, batch: int = 2, tokens: int = 3, vocab: int = 5, width: int = 4, layers: int = 2):
    torch.manual_seed(seed)
    hidden = tuple(torch.randn(batch, tokens, width) * (1 + 10 * i) for i in range(layers + 1))
    return SimpleNamespace(logits=torch.randn(batch, tokens, vocab), hidden_states=hidden)


@pytest.mark.parametrize("variant", ["reference", "token-mean", "normalized", "kl"])
def test_distill_loss_variants_by_hand(variant):
    student, teacher = _fake_outputs(0), _fake_outputs(1)
    batch, tokens, _ = teacher.logits.shape
    p_t = torch.softmax(teacher.logits, -1)
    kl_sum = (p_t * (torch.log_softmax(teacher.logits, -1) - torch.log_softmax(student.logits, -1))).sum()
    pairs = zip(student.hidden_states[1:], teacher.hidden_states[1:], strict=True)
    layer_mse = [((s - t) ** 2).mean() for s, t in pairs]
    teacher_square = [(t**2).mean() for t in teacher.hidden_states[1:]]  # the embeddings' [0] is not a layer
    expected = {
        "reference": kl_sum / batch + 10 * sum(layer_mse),
        "token-mean": kl_sum / (batch * tokens) + 10 * sum(layer_mse),
        "normalized": kl_sum / batch + 10 * sum(m / q for m, q in zip(layer_mse, teacher_square, strict=True)),
        "kl": kl_sum / batch,
    }[variant]
    loss, kl_per_token, hidden = distill_loss(student, teacher, DistillConfig(loss=variant, hidden_weight=10.0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_per_token.item() == pytest.approx(kl_sum.item() / (batch * tokens), rel=1e-5)
    raw_or_normalized = teacher_square if variant == "normalized" else [1.0] * len(layer_mse)
    by_hand = sum(m / q for m, q in zip(layer_mse, raw_or_normalized, strict=True))
    assert hidden.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(SqueezegenError, match="loss must be one of"):
        DistillConfig(loss="mse")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("config", [sg.BinaryMoSConfig(experts=3), sg.OneBitConfig(), sg.SignConfig()])
def test_save_load_round_trip_identical_logits(tmp_path, config, dtype):
    model, tok = sg.load("tiny-llama", dtype=dtype)
    sg.binarize_(model, config)
    assert {p.dtype for p in model.model.layers.parameters()} == {getattr(torch, dtype)}  # one dtype: FSDP shards it
    with torch.no_grad():  # trained-looking state: signs and scales away from their init
        for layer in model.modules():
            if hasattr(layer, "packed"):
                layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
    sg.pack_(model)
    ids = torch.tensor([[1, 50, 7, 300, 9, 11]])
    folder = sg.save(model, tok, tmp_path / "bin")
    loaded, tok2 = sg.load(folder, dtype=dtype)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(sg.load(folder)[0](ids).logits, model(ids).logits)  # auto: the dtype it was saved from
    assert tok2("hello world").input_ids == tok("hello world").input_ids
    packed_bytes = sum(m.packed.numel() for m in loaded.modules() if getattr(m, "packed", None) is not None)
    assert packed_bytes == sum(m.in_features * m.out_features // 8 for m in loaded.modules() if hasattr(m, "packed"))


def test_auto_loads_a_checkpoint_in_its_saved_dtype_and_another_one_is_reported(tmp_path, auto_dtype):
    from squeezegen.cli import main
    from squeezegen.cli.common import resolve_dtype_arg

    other = "float32" if auto_dtype == "bfloat16" else "bfloat16"  # saved where auto meant something else
    model, tok = sg.load("tiny-llama", dtype=other)
    sg.pack_(sg.binarize_(model, sg.BinaryMoSConfig(experts=2)))
    folder = sg.save(model, tok, tmp_path / "bin")
    assert json.loads((folder / "squeezegen_binary.json").read_text())["compute_dtype"] == other
    ids = torch.tensor([[1, 50, 7, 300, 9, 11]])
    loaded, _ = sg.load(folder)
    assert loaded.model.norm.weight.dtype == getattr(torch, other)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.warns(UserWarning, match=f"computing in {other}: in {auto_dtype} its logits differ"):
        sg.load(folder, dtype=auto_dtype)
    args = argparse.Namespace(model=str(folder), dtype="auto", device="cpu")
    assert resolve_dtype_arg(args) == other and args.dtype_auto  # what the CLI loads it in, and records
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: no dtype other than the saved one, nothing to report
        assert main(["generate", "--model", str(folder), "--prompt", "Hi there", "--max-new-tokens", "1"]) == 0


def test_distillation_refuses_a_student_without_float32_master_weights(tmp_path):
    teacher, _ = sg.load("tiny-llama", dtype="bfloat16")
    student = sg.binarize_(copy.deepcopy(teacher), sg.BinaryMoSConfig(experts=2))
    with pytest.raises(SqueezegenError, match="distill trains float32 master weights, but .* hold bfloat16"):
        distill(student, teacher, torch.randint(0, 1000, (2, 8)), DistillConfig(steps=1), tmp_path)


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
    lines = table.read_text().splitlines()
    assert "| decode tokens/s | vs bf16 | decoder linear MiB | bytes/weight |" in lines[0]
    assert lines[2].startswith("| tiny-llama float32 | float32 |")
    assert lines[3].startswith("| tiny-llama bfloat16 | bfloat16 |") and "| 1.00x |" in lines[3]
    assert lines[4].startswith("| bin |") and len(lines) == 5
    record = json.loads(table.with_suffix(".json").read_text())
    f32, bf16, binary = record["rows"]
    assert record["meta"]["reference"] == "tiny-llama bfloat16" and bf16["vs_reference"] == 1.0
    assert all(r["decode_tok_s"] > 0 for r in record["rows"])
    assert binary["vs_reference"] == pytest.approx(binary["decode_tok_s"] / bf16["decode_tok_s"])
    assert (f32["bytes_per_weight"], bf16["bytes_per_weight"]) == (4.0, 2.0)  # llama's linears have no bias
    assert f32["decoder_linear_weights"] == bf16["decoder_linear_weights"] == binary["decoder_linear_weights"]
    assert f32["embedding_head_bytes"] == 2 * bf16["embedding_head_bytes"]
    # signs at 1/8 byte, plus BinaryMoS's scales and router (a large share at tiny-llama's width)
    assert 1 / 8 < binary["bytes_per_weight"] < bf16["bytes_per_weight"]
    assert binary["embedding_head_bytes"] > 0 and binary["resident_bytes"] < f32["resident_bytes"]
    assert main([*bench, "--out", str(table)]) == 2  # the table is kept


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def run_dtype(request) -> str:
    """What dtype "auto" means in the torchrun runs of this module (each run is made for both)."""
    return request.param


def _torchrun_binarize(out, dtype: str, *flags: str) -> dict | None:
    """`squeezegen binarize` on tiny-llama in 2 CPU processes (gloo), with dtype "auto" resolving to
    `dtype` (bf16 autocast with it, float32 master weights either way); its report."""
    # --standalone: torchrun picks a free port itself, so two runs at once do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "squeezegen.cli", "binarize", "--model", "tiny-llama", "--steps", "4", "--batch", "1"]
    cmd += ["--block", "32", "--eval-blocks", "1", "--eval-every", "2", "--decode-tokens", "0"]
    cmd += ["--lr", "1e-3", "--out", str(out), *flags]  # a high lr: 4 steps move the model visibly
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SQUEEZEGEN_AUTO_DTYPE": dtype}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = out / "binarize_report.json"
    return json.loads(report.read_text()) if report.is_file() else None


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, run_dtype):
    out = tmp_path_factory.mktemp("torchrun") / "ddp"
    return out, _torchrun_binarize(out, run_dtype, "--parallel", "ddp")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, run_dtype):
    out = tmp_path_factory.mktemp("torchrun") / "fsdp"
    return out, _torchrun_binarize(out, run_dtype, "--parallel", "fsdp")


# FSDP against DDP: the same arithmetic summed in another order (reduce-scatter of shards against an
# all-reduce of buckets); seen <= 1e-6 relative in the losses of 4 float32 steps, 1e-4 in the logits.
LOSS_TOLERANCE = 1e-4
# of the largest |logit|; 4 steps at lr 1e-3 move them ~0.7 of it. In bf16 a logit's own rounding is
# 2^-8 of it, and a latent weight's sign that a last-bit gradient difference flipped moves some by ~1%
LOGIT_TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2}
# a resumed run against an uninterrupted one: the same operations in the same order, bit-exact in practice
RESUME_TOLERANCE = 1e-6


def _logits(folder) -> torch.Tensor:
    model, _ = sg.load(folder)  # in the dtype it was saved from
    with torch.no_grad():
        return model(torch.tensor([[1, 50, 7, 300, 9, 11, 400, 23]])).logits.float()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_distillation_runs_under_torchrun_with_two_processes(ddp_run, run_dtype):
    out, report = ddp_run
    assert (
        report["dtype"] == run_dtype
        and json.loads((out / "squeezegen_binary.json").read_text())["compute_dtype"] == run_dtype
    )
    assert report["train"]["tokens"] == 256 and report["train"]["world"] == 2  # 4 steps x 1 x 32 x 2 processes
    assert [r["tokens"] for r in report["history"]] == [64, 128, 192, 256]
    curve = report["held_out_curve"]  # --eval-every 2: held-out perplexity against tokens seen
    assert [(c["step"], c["tokens"]) for c in curve] == [(2, 128), (4, 256)]
    assert all(math.isfinite(c["held_out_perplexity"]) and c["held_out_perplexity"] > 1 for c in curve)
    assert [r["step"] for r in report["history"] if "held_out_perplexity" in r] == [2, 4]
    assert report["train"]["loss"] == "reference" and report["train"]["lr"] == 1e-3
    assert sg.load(out)[0].model.norm.weight.dtype == getattr(torch, run_dtype)  # model.dtype: the 16-bit embedding


def test_fsdp_first_losses_equal_ddp(ddp_run, fsdp_run, run_dtype):
    (ddp_out, ddp), (fsdp_out, fsdp) = ddp_run, fsdp_run
    assert fsdp["train"]["parallel"] == "fsdp" and ddp["train"]["parallel"] == "ddp"
    for a, b in zip(fsdp["history"][:3], ddp["history"][:3], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=LOSS_TOLERANCE), (a, b)
        assert a["kl"] == pytest.approx(b["kl"], rel=LOSS_TOLERANCE)
    # held-out perplexity measured on the sharded student, and the model rank 0 rebuilt from the shards
    assert fsdp["held_out_curve"][0]["held_out_perplexity"] == pytest.approx(
        ddp["held_out_curve"][0]["held_out_perplexity"], rel=1e-3
    )
    assert _close(_logits(fsdp_out), _logits(ddp_out)) < LOGIT_TOLERANCE[run_dtype]
    assert fsdp["perplexity_float"] == ddp["perplexity_float"]


@pytest.fixture(scope="module")
def stopped_fsdp_run(tmp_path_factory, run_dtype):
    out = tmp_path_factory.mktemp("torchrun") / "resumed"
    assert _torchrun_binarize(out, run_dtype, "--parallel", "fsdp", "--stop-after", "2") is None
    return out


def test_stopped_fsdp_run_keeps_only_its_checkpoint(stopped_fsdp_run):
    out = stopped_fsdp_run
    assert not out.exists()  # stopped: nothing packed or saved, only the checkpoint
    checkpoint = out.with_name("resumed.ckpt")
    assert torch.load(checkpoint / "checkpoint.pt", weights_only=True)["step"] == 2
    history = json.loads((checkpoint / "history.json").read_text())
    assert [(r["step"], r["tokens"]) for r in history] == [(1, 64), (2, 128)] and "held_out_perplexity" in history[1]


def test_resumed_fsdp_run_equals_an_uninterrupted_one(fsdp_run, stopped_fsdp_run, run_dtype):
    (straight_out, straight), out = fsdp_run, stopped_fsdp_run
    resumed = _torchrun_binarize(out, run_dtype, "--parallel", "fsdp", "--resume")
    assert [r["step"] for r in resumed["history"]] == [1, 2, 3, 4]
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=RESUME_TOLERANCE), (a, b)
        assert ("held_out_perplexity" in a) == ("held_out_perplexity" in b)
        if "held_out_perplexity" in a:
            assert a["held_out_perplexity"] == pytest.approx(b["held_out_perplexity"], rel=RESUME_TOLERANCE)
    assert resumed["perplexity_binary"] == pytest.approx(straight["perplexity_binary"], rel=RESUME_TOLERANCE)
    logits = _logits(out)
    assert _close(logits, _logits(straight_out)) <= RESUME_TOLERANCE
    teacher, _ = sg.load("tiny-llama", dtype=run_dtype)
    torch.manual_seed(0)  # the untrained student, as `binarize` seeds it: training moved far past the tolerance
    untrained = sg.pack_(sg.binarize_(teacher.float(), sg.BinaryMoSConfig()).to(getattr(torch, run_dtype)))
    with torch.no_grad():
        before = untrained(torch.tensor([[1, 50, 7, 300, 9, 11, 400, 23]])).logits.float()
    assert _close(logits, before) > 0.1


@pytest.mark.parametrize("shape", [(44, 30), (44, 1000)])  # the second is large enough for threads
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_half_head_kernel_equals_the_dense_product(shape, dtype, tolerance, tokens):
    assert native.runtime_library() is not None
    d_in, d_out = shape
    torch.manual_seed(0)
    weight = torch.randn(d_out, d_in).half()
    x = torch.randn(2, tokens, d_in).to(dtype)
    y = native.dense_linear(x, weight)
    reference = x.float() @ weight.float().T
    assert y.dtype == dtype and y.shape == (2, tokens, d_out)
    assert _relative_error(y, reference) <= tolerance
    assert native.dense_linear(x, weight.double()) is None  # float32 and 16-bit weights only
    assert native.dense_linear(torch.randn(1, native.KERNEL_TOKENS + 1, d_in), weight) is None


def test_pack_keeps_the_embedding_and_head_16bit_through_casts_and_saves(tmp_path):
    model, tok = sg.load("tiny-llama", dtype="float32")
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2 and Gemma 3
    model.config.tie_word_embeddings = True
    keys = set(model.state_dict())
    sg.binarize_(model, sg.BinaryMoSConfig(experts=2))
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.data = p.data.half().float()
    sg.pack_(model)
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.dtype == torch.float16 and head.weight is embedding.weight  # still one tensor
    model.to(torch.float32)  # a cast changes what they compute in, never the 16-bit weight
    assert head.weight.dtype == torch.float16
    ends = {"model.embed_tokens.weight", "lm_head.weight"} & keys
    assert ends <= set(model.state_dict())  # the checkpoint's names are unchanged
    ids = torch.tensor([[1, 50, 7, 300, 9]])
    with torch.no_grad():
        dense = model(ids).logits  # 5 tokens: the head's kernel; the blocks' kernels
        assert dense.dtype == torch.float32
        assert _relative_error(dense, reference(ids).logits) <= 1e-5
        hidden = torch.randn(1, 1, head.in_features)
        assert torch.equal(head(hidden), native.dense_linear(hidden, head.weight))  # decode: the kernel
    loaded, _ = sg.load(sg.save(model, tok, tmp_path / "bin"), dtype="float32")
    assert loaded.get_output_embeddings().weight.dtype == torch.float16
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert model.get_input_embeddings()(ids).dtype == torch.float32


def test_packed_gemma_embedding_keeps_its_scale():
    model, _ = sg.load("tiny-gemma3", dtype="float32")
    sg.binarize_(model, sg.OneBitConfig())
    reference = copy.deepcopy(model)
    for p in reference.parameters():
        p.data = p.data.half().float()
    sg.pack_(model)
    ids = torch.tensor([[1, 50, 7, 300, 9]])
    with torch.no_grad():
        assert torch.equal(model.get_input_embeddings()(ids), reference.get_input_embeddings()(ids))
        assert _relative_error(model(ids).logits, reference(ids).logits) <= 1e-4


def test_layers_sharing_an_input_compute_in_one_call_and_never_serve_a_stale_output():
    model, _ = sg.load("tiny-llama", dtype="float32")
    sg.binarize_(model, sg.BinaryMoSConfig(experts=3))
    sg.pack_(model)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    group = q.shared_input
    assert group is k.shared_input is v.shared_input and group.layers == (q, k, v)
    assert model.model.layers[0].mlp.down_proj.__dict__.get("shared_input") is None  # until it runs alone

    def alone(layer, x):  # the layer's own kernel call
        return kernels.binary_linear(x, layer.packed, layer.out_features, *layer.kernel_args())

    x = torch.randn(1, 2, q.in_features)
    with torch.no_grad():
        alone_qkv = [alone(layer, x) for layer in (q, k, v)]
        assert torch.equal(q(x), alone_qkv[0])
        assert set(group._outputs) == {k, v}  # one call made all three
        assert torch.equal(v(x), alone_qkv[2]) and torch.equal(k(x), alone_qkv[1])
        assert group._outputs == {} and group._x is None
        q(x)
        x.mul_(2)  # the same tensor changed in place: computed again
        assert torch.equal(k(x), alone(k, x))
        other = torch.randn(1, 1, q.in_features)
        assert torch.equal(v(other), alone(v, other))
        assert _relative_error(q(x), _dense(q, x)) <= 1e-5  # the grouped call is the layer
    with torch.inference_mode():  # the engine's mode: no version counters, the same outputs
        y = torch.randn(1, 1, q.in_features)
        assert torch.equal(k(y), alone(k, y)) and torch.equal(q(y), alone(q, y))


def test_decode_comparison_rotates_the_order_and_takes_medians(monkeypatch):
    from squeezegen.bench import binary_decode

    calls, speeds = [], {"a": iter([1, 9, 2, 3]), "b": iter([5, 4, 6, 7]), "c": iter([8, 2, 2, 9])}
    monkeypatch.setattr(binary_decode, "decode_tokens_per_s", lambda m, t, n: (calls.append(m), next(speeds[m]))[1])
    medians = binary_decode.compare_decode({k: k for k in "abc"}, None, tokens=4, rounds=3)
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # after one warm-up each
    assert medians == {"a": 3, "b": 6, "c": 2}


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_each_row_of_a_kernel_batch_equals_the_row_alone(kind):
    layer = _packed_layer(kind, bias=True, d_in=520, d_out=515)
    x = torch.randn(4, 3, 520)
    with torch.no_grad():
        batch = layer(x)
        for b in range(4):
            for t in range(3):
                assert torch.equal(batch[b, t], layer(x[b : b + 1, t : t + 1])[0, 0])
    half = torch.randn(300, 44).half()
    rows = torch.randn(5, 44)
    together = native.dense_linear(rows, half)
    assert all(torch.equal(together[i], native.dense_linear(rows[i : i + 1], half)[0]) for i in range(5))


def test_a_bf16_store_keeps_nan_and_inf():
    """A NaN whose payload fills the mantissa (0x7FFFFFFF) used to round into -0 in the kernel's bf16
    store; it stays NaN (helpers.h, shared by every kernel file), and an infinity stays infinite."""
    layer = _packed_layer("sign", bias=False)
    in_scales, out_scales, router, bias, layernorm = layer.kernel_args()
    scales = out_scales.clone()
    scales.view(torch.int32)[0, 0] = 0x7FFFFFFF
    scales[0, 1] = float("inf")
    x = torch.randn(1, 2, 44).to(torch.bfloat16)
    with torch.no_grad():
        y = kernels.binary_linear(x, layer.packed, layer.out_features, in_scales, scales, router, bias, layernorm)
    assert y is not None and y.dtype == torch.bfloat16
    assert y[..., 0].isnan().all() and not y[..., 1].isfinite().any() and y[..., 2:].isfinite().all()
