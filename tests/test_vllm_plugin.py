"""The vLLM plugin: its request parsing and selection here, and real `vllm serve` (CPU) on loopback.

The server tests need vLLM's own environment (`make vllm-env`); without it they skip with that
reason. `make test-vllm` runs them with SQUEEZEGEN_REQUIRE_VLLM=1, where a server that does not
start fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.evals.tasks import make_sample
from squeezegen.integrations.vllm.__main__ import serve_args, vllm_argv
from squeezegen.integrations.vllm.compression import freeable_tokens, layer_budgets, parse_request, select
from squeezegen.methods.registry import method
from tests.conftest import AUTO

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BLOCK = 128  # vLLM's CPU block size for this model (vllm:cache_config_info)
REQUIRED = bool(os.environ.get("SQUEEZEGEN_REQUIRE_VLLM"))  # make test-vllm: a server that cannot start fails
SERVER_MARKS = (
    pytest.mark.skipif(
        AUTO != "float32", reason="the vLLM servers run float32 whatever dtype auto means: run once, in `make test`"
    ),
    pytest.mark.skipif(
        not VLLM_PYTHON.exists() and not REQUIRED,
        reason="vLLM's environment is not built here: `make vllm-env` (then `make test-vllm`)",
    ),
)


def needs_servers(test):
    """The marks of a test against the real servers."""
    for mark in SERVER_MARKS:
        test = mark(test)
    return test


def spec(name: str, **args) -> dict:
    return {"squeezegen": json.dumps({"method": name, "args": args})}


# --- what runs without vLLM ------------------------------------------------------------------------


def test_a_request_names_its_method_as_squeezegen_serve_takes_it():
    assert parse_request(None) is None and parse_request({}) is None
    assert parse_request(spec("full")) is None
    built = parse_request(spec("snapkv", budget=0.25, heads="shared"))
    assert built == method("snapkv", budget=0.25, heads="shared")
    assert parse_request({"squeezegen": {"method": "pyramidkv", "args": {"budget": 0.5}}}) == method(
        "pyramidkv", budget=0.5
    )


@pytest.mark.parametrize(
    "extra, says",
    [
        (spec("kvzip"), "runs snapkv, pyramidkv, streaming_llm"),
        (spec("snapkv", adaptive=True), "adaptive=True"),
        (spec("snapkv", budget=2.5), "budget"),
        ({"squeezegen": "snapkv budget"}, "must be JSON"),
        ({"squeezegen": json.dumps({"method": "snapkv", "extra": 1})}, "must be an object"),
    ],
)
def test_a_bad_request_field_is_one_line_naming_the_fix(extra, says):
    with pytest.raises(SqueezegenError, match=says) as info:
        parse_request(extra)
    assert "\n" not in str(info.value)


def test_budgets_and_the_blocks_they_free():
    snap = method("snapkv", budget=0.25)
    assert layer_budgets(snap, 1000, 3) == [250, 250, 250]
    assert freeable_tokens(snap, 1000, 3) == 750
    pyramid = method("pyramidkv", budget=0.25)
    budgets = layer_budgets(pyramid, 1000, 30)
    assert budgets[0] > 250 > budgets[-1] and abs(sum(budgets) / 30 - 250) < 2
    assert freeable_tokens(pyramid, 1000, 30) == 1000 - budgets[0]  # the widest layer decides
    assert freeable_tokens(method("streaming_llm", budget=64), 1000, 3) == 936
    assert freeable_tokens(snap, 100, 3) == 75 and layer_budgets(method("snapkv", budget=500), 100, 2) == [100, 100]


def test_selection_keeps_sinks_and_the_newest_and_what_the_window_attends():
    torch.manual_seed(0)
    keys, values = torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    query = torch.randn(4, 6, 8) * 0.01  # 4 query heads over 2 KV heads, a 6-token window
    keep = select(method("streaming_llm", budget=10, sinks=4), 0, 2, 0.35, query, keys, values)
    assert keep.tolist() == [[0, 1, 2, 3, 34, 35, 36, 37, 38, 39]] * 2
    keys[0, 7] = query[0, -1] * 5000  # KV head 0's key 7 takes the window's attention
    keys[1, 12] = query[2, -1] * 5000
    keep = select(method("snapkv", budget=8, window=6, kernel=1), 0, 2, 0.35, query, keys, values)
    assert keep.shape == (2, 8) and bool((keep.diff(dim=1) > 0).all())  # ascending, 8 per head
    assert keep[:, -6:].tolist() == [list(range(34, 40))] * 2  # the window is always kept
    assert 7 in keep[0].tolist() and 12 in keep[1].tolist() and 12 not in keep[0].tolist()
    shared = select(method("snapkv", budget=8, window=6, kernel=1, heads="shared"), 0, 2, 0.35, query, keys, values)
    assert shared[0].tolist() == shared[1].tolist() and {7, 12} <= set(shared[0].tolist())


def test_the_launcher_adds_the_plugin_and_keeps_what_the_user_chose():
    args = serve_args(["/m", "--dtype", "float32"])
    assert args[:3] == ["/m", "--dtype", "float32"]
    assert "squeezegen.integrations.vllm.worker.SqueezeWorker" in args and "--no-enable-prefix-caching" in args
    mine = serve_args(["/m", "--scheduler-cls=my.Scheduler", "--enable-prefix-caching"])
    assert "--scheduler-cls" not in mine and "--no-enable-prefix-caching" not in mine
    assert serve_args(["/m", "--without-plugin"]) == ["/m"]


def _launch(*argv: str) -> subprocess.CompletedProcess:
    """The launcher in this test's Python: what it refuses, it refuses before vLLM is imported."""
    command = [sys.executable, "-m", "squeezegen.integrations.vllm", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "/no/such/model/folder"], "model folder /no/such/model/folder does not exist"),
        (["serve", "./missing", "--port", "8001"], "model folder ./missing does not exist"),
        (["serve", "--port", "8001"], "name the model"),
        (["serve", "--model", "/no/such/folder"], "does not exist"),
    ],
)
def test_the_launcher_refuses_a_missing_model_in_one_line(argv, message):
    done = _launch(*argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("squeezegen: error: ") and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_the_launcher_refuses_a_folder_without_a_config_and_passes_hub_ids_on(tmp_path):
    done = _launch("serve", str(tmp_path))
    assert done.returncode == 2 and "holds no config.json" in done.stderr
    assert vllm_argv(["serve", "Qwen/Qwen3-0.6B", "--dtype", "float32"])[:4] == [
        "serve",
        "Qwen/Qwen3-0.6B",
        "--dtype",
        "float32",
    ]
    (tmp_path / "config.json").write_text("{}")
    assert "no model_type" in _launch("serve", str(tmp_path)).stderr
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert "holds no weights" in _launch("serve", str(tmp_path)).stderr
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert "holds no tokenizer" in _launch("serve", str(tmp_path)).stderr
    (tmp_path / "tokenizer.json").write_text("{}")
    assert vllm_argv(["serve", "--model", str(tmp_path)])[:3] == ["serve", "--model", str(tmp_path)]
    done = _launch("serve", str(tmp_path), "--port", "70000")
    assert done.returncode == 2 and "no TCP port" in done.stderr and "Traceback" not in done.stderr
    assert "is a file" in _launch("serve", str(tmp_path / "tokenizer.json")).stderr


def test_the_launcher_help_names_what_it_adds(capsys):
    assert vllm_argv(["serve", "--help"]) == ["serve", "--help"]  # vLLM's own help follows
    shown = capsys.readouterr().out
    assert "--without-plugin" in shown and "--no-enable-prefix-caching" in shown and "SqueezeWorker" in shown


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this Python")
def test_the_launcher_without_vllm_says_where_it_is(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    done = _launch("serve", str(tmp_path))
    assert done.returncode == 2 and "make vllm-env" in done.stderr and done.stderr.count("\n") == 1


# --- real servers ----------------------------------------------------------------------------------


def _unavailable(reason: str):
    """vLLM installed but not running on this machine: a skip with the reason, or a failure under
    `make test-vllm`."""
    if not REQUIRED:
        pytest.skip(reason)
    pytest.fail(reason)


def _start(folder: Path, port: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    command = [str(VLLM_PYTHON), "-m", "squeezegen.integrations.vllm", "serve", str(folder), "--port", str(port)]
    command += [
        "--host",
        "127.0.0.1",
        "--served-model-name",
        "smollm2",
        "--dtype",
        "float32",
        "--max-model-len",
        "4096",
    ]
    log = open(f"/tmp/squeezegen-vllm-{port}.log", "w")  # noqa: SIM115 (the server writes it while it runs)
    return subprocess.Popen([*command, *extra], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(proc: subprocess.Popen, port: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = Path(f"/tmp/squeezegen-vllm-{port}.log").read_text().strip().splitlines()[-1:]
            _unavailable(f"vllm serve exited ({proc.returncode}) on this machine: {' '.join(tail)}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return
        except OSError:
            time.sleep(2)
    _unavailable(f"vllm serve did not start within {timeout:.0f} s")


@pytest.fixture(scope="module")
def servers():
    """(plugin client, plain vLLM client, plugin metrics URL): two real servers on loopback."""
    from squeezegen.models.bundled import BUNDLED, dequantized_folder

    folder = dequantized_folder(BUNDLED["smollm2-135m"])
    procs = [_start(folder, 8071), _start(folder, 8072, "--without-plugin")]
    try:
        for proc, port in zip(procs, (8071, 8072), strict=True):
            _wait(proc, port)
        clients = [openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-") for port in (8071, 8072)]
        yield clients[0], clients[1], "http://127.0.0.1:8071/metrics"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _answer(client, prompt: str, extra: dict | None = None, max_tokens: int = 24) -> str:
    body = {"vllm_xargs": extra} if extra else None
    messages = [{"role": "user", "content": prompt}]
    reply = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=max_tokens, temperature=0, extra_body=body
    )
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def needles(servers):
    _, tok = sg.load("smollm2-135m", dtype="float32")
    return [make_sample("niah_number", tok, 1500, seed=300 + seed) for seed in range(4)]


@needs_servers
def test_a_full_cache_answer_equals_vllm_without_the_plugin(servers, needles):
    plugin, plain, _ = servers
    prompts = [needles[0].prompt, needles[1].prompt, "Name three uses of a Python dictionary."]
    for prompt in prompts:
        expected = _answer(plain, prompt)
        assert _answer(plugin, prompt) == expected
        # budget 1.0 keeps every entry through the packing path: the same answer again
        assert _answer(plugin, prompt, spec("snapkv", budget=1.0)) == expected


@needs_servers
def test_the_body_field_of_squeezegen_serve_selects_the_method_too(servers, needles):
    plugin, _, _ = servers
    chosen = {"method": "streaming_llm", "args": {"budget": 16}}  # 4 sinks and 12 newest: the needle is gone
    messages = [{"role": "user", "content": needles[0].prompt}]
    reply = plugin.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=24, temperature=0, extra_body={"squeezegen": chosen}
    )
    through_xargs = _answer(plugin, needles[0].prompt, spec("streaming_llm", budget=16))
    assert reply.choices[0].message.content == through_xargs != _answer(plugin, needles[0].prompt)
    with pytest.raises(openai.BadRequestError, match="squeezegen field: .*tova"):
        plugin.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=2, extra_body={"squeezegen": {"method": "tova"}}
        )


@needs_servers
@pytest.mark.parametrize("heads", ["per-head", "shared"])
def test_a_compressed_request_answers_as_squeezegen_does(servers, needles, heads):
    plugin, _, _ = servers
    model, tok = sg.load("smollm2-135m", dtype="float32")
    ours, theirs, same = 0.0, 0.0, 0
    for sample in needles:
        served = _answer(plugin, sample.prompt, spec("snapkv", budget=0.25, heads=heads))
        local = sg.generate(
            model, tok, sample.prompt, max_new_tokens=24, chat=True, method=method("snapkv", budget=0.25, heads=heads)
        ).texts[0]
        ours, theirs, same = ours + sample.score(served), theirs + sample.score(local), same + (served == local)
    assert abs(ours - theirs) <= 1  # the same needle accuracy within one sample of four
    assert same >= len(needles) // 2  # and most answers word for word


def _usage(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url).read().decode()
    return float(next(line for line in text.splitlines() if line.startswith("vllm:kv_cache_usage_perc")).split()[-1])


def _total_blocks(metrics_url: str) -> int:
    """vLLM's KV blocks in all (vllm:cache_config_info), after checking their size is BLOCK."""
    text = urllib.request.urlopen(metrics_url).read().decode()
    info = next(line for line in text.splitlines() if line.startswith("vllm:cache_config_info"))
    assert f'block_size="{BLOCK}"' in info
    return int(info.split('num_gpu_blocks="')[1].split('"')[0])


def _blocks_in_use(client, metrics_url: str, prompt: str, extra: dict | None, at: tuple, max_tokens: int) -> list[int]:
    """KV blocks in use (vLLM's own gauge) while the request decodes, after the tokens `at`."""
    total = _total_blocks(metrics_url)
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, **({"vllm_xargs": extra} if extra else {})},
    )
    return [round(_usage(metrics_url) * total) for i, _ in enumerate(stream) if i in at]


@needs_servers
def test_a_compressed_request_returns_its_blocks_to_vllm(servers):
    plugin, _, metrics_url = servers
    _, tok = sg.load("smollm2-135m", dtype="float32")
    sample = make_sample("niah_number", tok, 3000, seed=77)
    messages = [{"role": "user", "content": sample.prompt}]
    prompt = plugin.chat.completions.create(model="smollm2", messages=messages, max_tokens=1).usage.prompt_tokens
    full = max(_blocks_in_use(plugin, metrics_url, sample.prompt, None, (4, 12), 24))
    assert full == math.ceil((prompt + 5) / BLOCK) or full == math.ceil((prompt + 13) / BLOCK)
    for name, args in [
        ("snapkv", {"budget": 0.25}),
        ("streaming_llm", {"budget": 0.25}),
        ("pyramidkv", {"budget": 0.25}),
    ]:
        freed = freeable_tokens(method(name, **args), prompt, 30) // BLOCK  # SmolLM2: 30 layers
        assert max(_blocks_in_use(plugin, metrics_url, sample.prompt, spec(name, **args), (4, 12), 24)) <= full - freed
        assert freed >= (5 if name != "pyramidkv" else 2)


@needs_servers
def test_a_rolling_window_keeps_its_blocks_bounded_over_a_long_generation(servers):
    """StreamingLLM frees the blocks its window has left while it decodes: the blocks in use stay
    at the first kept block plus the window's, where the full cache's keep growing."""
    plugin, _, metrics_url = servers
    _, tok = sg.load("smollm2-135m", dtype="float32")
    prompt = make_sample("niah_number", tok, 1000, seed=78).prompt

    def in_use(extra: dict | None) -> list[int]:
        return _blocks_in_use(plugin, metrics_url, prompt, extra, (100, 300, 590), 600)

    full = in_use(None)
    rolling = in_use(spec("streaming_llm", budget=200))  # 200 entries: the first kept block and two more
    assert full[-1] >= full[0] + 3  # the full cache grows a block every 128 tokens
    assert max(rolling) <= math.ceil(200 / BLOCK) + 2 and rolling[-1] <= rolling[0] + 1


@needs_servers
@pytest.mark.parametrize(
    "extra",
    [spec("h2o"), spec("snapkv", budget=-1), spec("snapkv", heads="sideways"), {"squeezegen": "{"}],
)
def test_a_bad_request_gets_400_and_the_server_goes_on(servers, extra):
    plugin, _, _ = servers
    with pytest.raises(openai.BadRequestError) as info:
        _answer(plugin, "Hello.", extra, max_tokens=2)
    assert info.value.status_code == 400 and "squeezegen field:" in str(info.value)
    assert _answer(plugin, "Say hello.", max_tokens=4)
