"""The engine's fused decode forward (runtime/fused.py), run in C (runtime/native_step.py) or as torch
operations, against the HF layers it replaces in decoding: the same logits step by step, for every
family, with decode-time methods, padded batches and packed 1-bit layers; weights held once;
rebuilt when the model's weights move."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import squeezegen as sg
from squeezegen.models.tiny import tiny_config
from squeezegen.runtime import native
from squeezegen.runtime.engine import Engine
from squeezegen.runtime.fused import FusedDecoder

from .conftest import AUTO, TINY, tiny
from .test_engine_parity import BATCH, PROMPT

# float32: the fused products sum in the order the separate ones do on the CPUs seen (bit-exact);
# bf16: a concatenated GEMV may block its sums otherwise, each logit rounds to 2^-8 of itself; the
# C step rounds where the HF layers do but sums norms, attention and products in its own order, and
# one bf16 ulp here and there grows through the tiny random models' layers (a few % of the largest
# logit; how far from float32 it lands is checked against the HF layers' own bf16 below)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
C_BF16 = 6e-2


def decode_logits(
    model, ids, fused: bool, steps: int = 24, method=None, mask=None, native: bool = True, feed=None
) -> torch.Tensor:
    """Logits (steps, B, V) of decoding after a prefill, through the fused forward (in C, or as torch
    operations) or the HF layers: greedy, or fed the tokens `feed` (steps, B) (what another path
    chose, so that two paths are compared on the same inputs and a bf16 near-tie cannot fork them)."""
    engine = Engine(model, method, reserve=8, fused=fused, native=native)  # 8: the buffers grow twice on the way
    token = engine.prefill(ids, mask).argmax(-1)
    out = []
    for step in range(steps):
        logits = engine.decode(token if feed is None else feed[step])
        out.append(logits)
        token = logits.argmax(-1)
    if fused:
        assert engine.fused is not None, "the fused forward did not take this model"
        assert not native or engine.fused.native is not None, "the C step did not take this model"
    return torch.stack(out)


def c_steps(model) -> int:
    """Decode steps the model's C step has run so far."""
    return FusedDecoder.of(model, Engine(model).parts).native.steps


def paired(
    model, ids, steps: int = 24, method=None, mask=None, native: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused, HF layers) logits on the same inputs: the HF layers decode greedily, the fused
    forward is fed the tokens they chose."""
    reference = decode_logits(model, ids, False, steps, method, mask)
    feed = feed_of(reference, model, ids, method, mask)
    return decode_logits(model, ids, True, steps, method, mask, native, feed), reference


def feed_of(logits, model, ids, method=None, mask=None) -> torch.Tensor:
    """The tokens (steps, B) a greedy decoding that gave `logits` was fed."""
    first = Engine(model, method).prefill(ids, mask).argmax(-1)
    return torch.cat([first[None], logits.argmax(-1)[:-1]])


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    return bool((a - b).abs().max() <= TOLERANCE[dtype] * b.abs().max())


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", TINY)
def test_fused_decode_equals_the_hf_layers(name, dtype, native):
    model, tok = sg.load(name, dtype=dtype)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    fused, reference = paired(model, ids, native=native)
    if dtype == torch.bfloat16 and native:
        assert (fused - reference).abs().max() <= C_BF16 * reference.abs().max()
        # as near float32 as the HF layers' bf16 is, on the same tokens
        exact = decode_logits(sg.load(name, dtype=torch.float32)[0], ids, False, feed=feed_of(reference, model, ids))
        assert (fused - exact).abs().max() <= 1.5 * (reference - exact).abs().max()
    else:
        assert close(fused, reference, dtype)
    if dtype == torch.float32:
        assert torch.equal(fused.argmax(-1), reference.argmax(-1))
        greedy = decode_logits(model, ids, True, native=native)  # on its own tokens too
        assert torch.equal(greedy.argmax(-1), reference.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_the_c_steps_attention_for_real_head_sizes_equals_the_hf_layers(head_dim, dtype):
    # the sizes of SmolLM2 (64), Qwen (128) and Gemma-3 (256) take the attention's vector paths
    # (several slots a pass, a head's sums held in registers), which the tiny models' 16 do not
    config = tiny_config("tiny-llama")
    config.head_dim, config.num_hidden_layers = head_dim, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    ids = tiny("tiny-llama")[1](BATCH[1], return_tensors="pt").input_ids  # 40 tokens: many 4-slot passes
    fused, reference = paired(model, ids, steps=8)
    assert (fused - reference).abs().max() <= (C_BF16 if dtype == torch.bfloat16 else 1e-5) * reference.abs().max()


@pytest.mark.parametrize("native", [True, False], ids=["c", "torch"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_fused_decode_of_a_padded_batch_equals_the_hf_layers(name, native):
    model, tok = tiny(name)
    enc = tok(BATCH, return_tensors="pt", padding=True, padding_side="left")
    fused, reference = paired(model, enc.input_ids, mask=enc.attention_mask, native=native)
    assert close(fused, reference, torch.float32)


@pytest.mark.parametrize(
    "method",
    [
        sg.method("h2o", budget=24),
        sg.method("tova", budget=0.5),
        sg.method("streaming_llm", budget=20),
        sg.method("rpc", P=8, R=4, c=2),
        sg.method("snapkv", budget=0.3, adaptive=True),  # uneven heads: buffers of their own
    ],
    ids=["h2o", "tova", "streaming_llm", "rpc", "adakv"],
)
def test_decode_time_methods_run_in_the_fused_step(method):
    model, tok = tiny("tiny-llama")
    ids = tok(" ".join([PROMPT] * 3), return_tensors="pt").input_ids
    fused = decode_logits(model, ids, True, method=method, native=False)
    assert close(fused, decode_logits(model, ids, False, method=method), torch.float32)
    # and in C: each layer's queries reach after_decode_attention (H2O's scores, TOVA's victims, ...); a
    # layer split into per-head buffers (AdaKV) is decoded by the torch step
    before = c_steps(model)
    assert close(decode_logits(model, ids, True, method=method, native=True), fused, torch.float32)
    if not getattr(method, "adaptive", False):
        assert c_steps(model) > before


def test_packed_binary_layers_decode_through_their_kernels_in_the_fused_step():
    model, tok = sg.load("tiny-llama", dtype="float32")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    before = decode_logits(model, ids, True, steps=8)  # fused weights made for the float layers...
    sg.pack_(sg.binarize_(model, sg.BinaryMoSConfig(experts=2)))  # ...which are then replaced
    fused = decode_logits(model, ids, True, steps=8)
    assert close(fused, decode_logits(model, ids, False, steps=8), torch.float32)
    assert not close(fused, before, torch.float32)


def test_fused_weights_are_the_hf_weights_not_a_copy():
    model, tok = sg.load("tiny-qwen2", dtype="float32")  # q/k/v with biases
    ids = tok(PROMPT, return_tensors="pt").input_ids
    before = model(ids).logits
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    decoder = FusedDecoder.of(model, Engine(model).parts)
    attn = model.model.layers[0].self_attn
    qkv = decoder.layers[0].qkv
    assert attn.q_proj.weight.untyped_storage().data_ptr() == qkv.weight.untyped_storage().data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == qkv.bias.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == nbytes
    assert len({p.untyped_storage().data_ptr() for p in model.parameters()}) < len(storages)  # views now
    assert torch.equal(model(ids).logits, before)  # the HF forward computes what it did
    assert FusedDecoder.of(model, Engine(model).parts) is decoder  # made once per model


def test_the_fused_forward_follows_a_cast_and_a_copy_of_the_model():
    model, tok = sg.load("tiny-llama", dtype="float32")
    ids = tok(PROMPT, return_tensors="pt").input_ids
    decode_logits(model, ids, True, steps=2)
    twin = copy.deepcopy(model)
    model.to(torch.bfloat16)
    fused = decode_logits(model, ids, True, steps=6)
    assert fused.dtype == torch.float32 and close(fused, decode_logits(model, ids, False, steps=6), torch.bfloat16)
    decode_logits(twin, ids, True, steps=2)  # the copy's own fused weights
    with torch.no_grad():
        twin.model.layers[0].self_attn.q_proj.weight.mul_(2)  # edited in place after they were made
        twin.model.layers[1].mlp.down_proj.weight.mul_(-1)
    assert close(decode_logits(twin, ids, True, steps=6), decode_logits(twin, ids, False, steps=6), torch.float32)


def test_the_compiled_fused_step_gives_the_eager_tokens():
    """Under torch.compile the C kernel steps aside (no graph break) and the compiler's products serve."""
    model, tok = tiny("tiny-llama")
    eager = sg.generate(model, tok, PROMPT, max_new_tokens=8, ignore_eos=True)
    compiled = sg.generate(model, tok, PROMPT, max_new_tokens=8, ignore_eos=True, compile=True)
    assert compiled.token_ids == eager.token_ids


WARM_START = """
import json, torch, squeezegen as sg
from torch._dynamo.utils import counters
model, tok = sg.load("tiny-llama", dtype="float32")
out = sg.generate(model, tok, "The cache", max_new_tokens=3, ignore_eos=True, compile=True)
print(json.dumps({"tokens": out.token_ids, **{k: v for k, v in counters["inductor"].items() if "fxgraph" in k}}))
"""


@pytest.mark.skipif(AUTO != "float32", reason="dtype-independent (tiny-llama in float32): runs once, in `make test`")
def test_a_second_process_finds_the_compiled_step_in_squeezegens_cache(tmp_path):
    """Inductor's products go to <squeezegen cache>/compile, and a second run of the same model and
    dtype loads them instead of compiling (torch's default /tmp cache is not used: its state here is
    whatever other runs left, so a first run could not miss)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["SQUEEZEGEN_CACHE"] = str(tmp_path)  # tiny models are built from configs: nothing to fetch

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", WARM_START], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm = run(), run()
    assert cold.get("fxgraph_cache_miss", 0) > 0 and cold.get("fxgraph_cache_hit", 0) == 0, cold
    assert warm.get("fxgraph_cache_hit", 0) > 0 and warm.get("fxgraph_cache_miss", 0) == 0, warm
    assert warm["tokens"] == cold["tokens"]
    assert any((tmp_path / "compile").rglob("*")), "nothing was written under <squeezegen cache>/compile"


def test_4bit_layers_decode_through_their_kernel_in_the_c_step():
    model, tok = sg.load("tiny-qwen2", dtype="float32")  # q/k/v biases: concatenated 4-bit groups with biases
    ids = tok(PROMPT, return_tensors="pt").input_ids
    sg.quantize_(model, sg.Int4WeightOnlyConfig())
    before = c_steps(model)
    fused, reference = paired(model, ids, steps=8)
    assert close(fused, reference, torch.float32) and c_steps(model) > before
    torch_ops, _ = paired(model, ids, steps=8, native=False)
    assert close(fused, torch_ops, torch.float32)


def test_a_model_cast_after_decoding_decodes_again():
    """The fused forward (and the C step's pointers) are made again when the model's tensors move."""
    model, tok = sg.load("tiny-llama", dtype="float32")
    sg.quantize_(model, sg.Int4WeightOnlyConfig())
    ids = tok(PROMPT, return_tensors="pt").input_ids
    decode_logits(model, ids, True, steps=2)
    model.to(torch.bfloat16)
    fused, reference = paired(model, ids, steps=6)
    assert fused.dtype == torch.float32 and (fused - reference).abs().max() <= C_BF16 * reference.abs().max()


def test_more_rows_than_the_c_step_takes_decode_as_torch_operations():
    model, tok = tiny("tiny-llama")
    prompts = [f"{PROMPT} {i}" for i in range(native.STEP_ROWS + 1)]  # the C step takes up to 64 rows
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    before = c_steps(model)
    fused, reference = paired(model, enc.input_ids, steps=4, mask=enc.attention_mask)
    assert c_steps(model) == before and close(fused, reference, torch.float32)


def test_forty_rows_decode_through_the_c_step_each_as_it_would_alone():
    """Past the module kernel's 16 tokens the step's products run in tiles of rows: every row of a
    40-row batch still gets the tokens it gets alone."""
    model, tok = tiny("tiny-llama")
    prompts = [f"{PROMPT} {i}" * (1 + i % 3) for i in range(40)]  # three lengths: left padding
    before = c_steps(model)
    together = sg.generate(model, tok, prompts, max_new_tokens=6, ignore_eos=True).token_ids
    assert c_steps(model) > before
    for i in (0, 1, 2, 17, 39):
        assert together[i] == sg.generate(model, tok, prompts[i], max_new_tokens=6, ignore_eos=True).token_ids[0]


def test_engines_on_other_threads_share_the_c_step_safely():
    """One model's C step holds one set of structs: engines decoding at once from several threads
    take turns, each getting the tokens it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    model, tok = tiny("tiny-llama")
    prompts = [PROMPT, "The cache of a layer", "Once upon a time there was", BATCH[0]]
    alone = [sg.generate(model, tok, p, max_new_tokens=12, ignore_eos=True).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda p: sg.generate(model, tok, p, max_new_tokens=12, ignore_eos=True).token_ids, prompts)
        )
    assert together == alone


def test_a_model_the_fused_step_cannot_take_says_so_once():
    """A family the fused forward does not know decodes through the HF layers, with a warning that
    names the reason and the cost, once."""
    import warnings

    model, _ = tiny("tiny-llama")
    other = copy.deepcopy(model)
    other.config.hidden_act = "relu"  # no fused activation for it
    parts = Engine(other).parts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):  # the engine asks at every generation, from one place
            assert FusedDecoder.of(other, parts) is None
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "decodes through its Hugging Face layers, about 3x slower" in messages[0]
    assert "relu" in messages[0]


def test_where_each_family_decodes_is_what_the_engine_page_says():
    """`squeezegen models` and docs/engine.md list where each family decodes; a family that left
    the C step (or a layer the fused step cannot take) shows here and there."""
    from pathlib import Path

    from squeezegen.models.tiny import TINY_CONFIGS
    from squeezegen.runtime.fused import decode_path

    page = (Path(__file__).resolve().parents[1] / "docs" / "engine.md").read_text()
    for name, config in TINY_CONFIGS.items():
        model, _ = tiny(name)
        assert f"| {config['model_type']} | {decode_path(model)} |" in page, name
    other = copy.deepcopy(tiny("tiny-llama")[0])
    other.config.hidden_act = "relu"
    assert decode_path(other) == "Hugging Face layers"
