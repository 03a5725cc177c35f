"""The blockwise recipe: block-wise reconstruction, the time-budgeted recipe, its training text."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import squeezegen as sg
from squeezegen.errors import SqueezegenError
from squeezegen.quant.api import decoder_layers
from squeezegen.quant.blockwise import (
    BlockwiseConfig,
    first_inputs,
    layer_calls,
    lr_factor,
    reconstruct_blocks,
    relative_mse,
    run_block,
)

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def _pair(name: str = "tiny-llama", config=None):
    teacher, tok = sg.load(name, dtype="float32")
    torch.manual_seed(0)
    student = sg.binarize_(copy.deepcopy(teacher), config or sg.BinaryMoSConfig(experts=2))
    return teacher, student, tok


def _blocks(vocab: int, rows: int = 8, tokens: int = 24) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, tokens), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_caught_block_calls_replay_the_models_own_forward(name):
    """Blocks run one by one with the caught arguments give the model's own hidden states: the
    rotary embeddings, masks (gemma3's sliding window, crossed at 24 tokens) and scaled embeddings
    are the model's."""
    teacher, _, _ = _pair(name)
    ids = _blocks(teacher.config.vocab_size, rows=2)
    x, calls = layer_calls(teacher, ids)
    expected = teacher(ids, output_hidden_states=True).hidden_states
    assert torch.allclose(x, expected[0])
    for i, layer in enumerate(decoder_layers(teacher)[:-1]):
        x = run_block(layer, x, calls[i], 2, NO_AUTOCAST)
        assert torch.allclose(x, expected[i + 1], atol=1e-5), i
    assert torch.equal(first_inputs(teacher, ids, 1), expected[0])


def test_relative_mse_and_lr_factor_by_hand():
    out, target = torch.tensor([[1.0, 3.0], [20.0, 20.0]]), torch.tensor([[2.0, 2.0], [10.0, 10.0]])
    # per token: (1 + 1) / (4 + 4) and (100 + 100) / (100 + 100), then their mean; one ratio over the
    # whole batch would be 202 / 208, all but the large token's
    assert relative_mse(out, target).item() == pytest.approx((0.25 + 1.0) / 2)
    assert lr_factor(0.025, 0.05) == pytest.approx(0.5)
    assert lr_factor(0.0, 0.05) == pytest.approx(0.01)  # the first step moves a little, not never
    assert lr_factor(0.05, 0.05) == pytest.approx(1.0)
    assert lr_factor(0.525, 0.05) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.05) == pytest.approx(0.0) and lr_factor(1.3, 0.05) == pytest.approx(0.0)
    with pytest.raises(SqueezegenError, match="min_steps"):
        BlockwiseConfig(seconds=1.0, min_steps=0)


@pytest.mark.parametrize("config", [sg.BinaryMoSConfig(experts=2), sg.OneBitConfig(), sg.SignConfig()])
def test_each_block_learns_its_teachers_output_and_a_resume_loads_it(tmp_path, config):
    teacher, student, _ = _pair(config=config)
    blocks = _blocks(teacher.config.vocab_size)
    before = copy.deepcopy(student)
    settings = BlockwiseConfig(seconds=0.1, batch=2, lr=1e-2, bf16="off", min_steps=30)  # steps, not time
    history = reconstruct_blocks(student, teacher, blocks, settings, tmp_path)
    assert [r["block"] for r in history] == list(range(len(decoder_layers(student))))
    assert all(r["last_loss"] < r["first_loss"] for r in history)  # every block got closer
    assert all(r["steps"] >= 30 and r["tokens"] == r["steps"] * 2 * 24 for r in history)
    changed = [n for (n, a), b in zip(student.named_parameters(), before.parameters(), strict=True) if not a.equal(b)]
    assert changed and all(".layers." in n for n in changed)  # embeddings, head and norms stay
    assert not any(n.endswith("norm.weight") for n in changed)

    # a run stopped after the first block: the resume loads it and trains the others
    (tmp_path / "blocks.json").write_text(json.dumps(history[:1]))
    for later in range(1, len(history)):
        (tmp_path / f"block_{later:02d}.pt").unlink()
    fresh = copy.deepcopy(before)
    resumed = reconstruct_blocks(fresh, teacher, blocks, settings, tmp_path, resume=True)
    assert resumed[0] == history[0] and len(resumed) == len(history)
    for a, b in zip(decoder_layers(fresh)[0].parameters(), decoder_layers(student)[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(decoder_layers(fresh)[1].mlp.up_proj.weight, decoder_layers(before)[1].mlp.up_proj.weight)


def test_blockwise_refuses_an_unbinarized_student_and_too_little_text(tmp_path):
    teacher, student, _ = _pair()
    blocks = _blocks(teacher.config.vocab_size, rows=1)
    with pytest.raises(SqueezegenError, match="binarize_"):
        reconstruct_blocks(teacher, teacher, blocks, BlockwiseConfig(seconds=1.0), tmp_path)
    with pytest.raises(SqueezegenError, match="at least 4 blocks"):
        reconstruct_blocks(student, teacher, blocks, BlockwiseConfig(seconds=1.0), tmp_path)
    with pytest.raises(SqueezegenError, match="seconds > 0"):
        BlockwiseConfig(seconds=0)


def test_held_out_text_never_enters_training():
    from squeezegen.evals import training_text as text
    from squeezegen.evals.corpus import split_text

    pytest.importorskip("long_context_eval", reason="RULER's data: pip install 'squeezegen[benchmarks]'")
    held_essays, held_docs = text.essays("test"), split_text("test")
    assert len(held_essays) > 10_000 and held_essays[:200] not in text.essays("train")
    for source, held in (("essays", held_essays), ("corpus", held_docs)):
        paragraphs = [p for p in text.paragraphs(source) if len(p) > 200]
        assert paragraphs and not any(p[:200] in held for p in paragraphs), source


def test_training_blocks_mix_the_sources_by_share():
    from squeezegen.evals.training_text import MIX, training_blocks

    pytest.importorskip("long_context_eval", reason="RULER's data: pip install 'squeezegen[benchmarks]'")
    _, tok = sg.load("tiny-llama", dtype="float32")
    sources = ("corpus", "essays", "squad", "hotpotqa")
    blocks, counts = training_blocks(tok, 8192, 64, sources=sources)
    assert blocks.shape == (sum(counts.values()) // 64, 64)
    total = sum(MIX[s] for s in sources)
    for source in sources:
        assert counts[source] == pytest.approx(8192 * MIX[source] / total, abs=64), source
    again, _ = training_blocks(tok, 8192, 64, sources=sources)
    assert torch.equal(blocks, again)  # seeded: a resumed run's text is the same


def test_teacher_text_is_the_teachers_own_sampled_text():
    from squeezegen.evals.training_text import teacher_blocks

    pytest.importorskip("long_context_eval", reason="RULER's data: pip install 'squeezegen[benchmarks]'")
    teacher, tok = sg.load("tiny-llama", dtype="float32")
    rows = teacher_blocks(teacher, tok, 3, 16, seed=0, batch=4)
    assert rows.shape == (3, 16)
    assert len({tuple(r.tolist()) for r in rows}) == 3  # sampled, not one greedy text


def test_binarize_blockwise_in_a_time_budget_saves_a_model_that_generates(tmp_path):
    from squeezegen.cli import main

    pytest.importorskip("long_context_eval", reason="RULER's data: pip install 'squeezegen[benchmarks]'")
    out = tmp_path / "bin"
    args = ["binarize", "--model", "tiny-llama", "--recipe", "blockwise", "--time-budget", "15", "--block", "32"]
    args += ["--batch", "2", "--data", "corpus", "essays", "--eval-blocks", "2", "--decode-tokens", "0"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "binarize_report.json").read_text())
    recipe = report["recipe"]
    assert recipe["recipe"] == "blockwise" and set(recipe["data_tokens"]) == {"corpus", "essays"}
    assert len(recipe["blocks"]) == 4 and all(r["steps"] > 0 for r in recipe["blocks"])
    assert recipe["end_to_end_steps"] == report["train"]["steps"] >= 0
    assert set(report["held_out"]) == {"cpython-docs", "essays"}
    model, tok = sg.load(out)
    assert sg.bits_per_weight(model) > 1
    assert len(sg.generate(model, tok, "The essay", max_new_tokens=4, ignore_eos=True).token_ids[0]) == 4
    assert main([*args, "--out", str(tmp_path / "other"), "--recipe", "end-to-end", "--block-lr", "0"]) == 2


def test_binarize_blockwise_needs_a_time_budget(capsys):
    from squeezegen.cli import main

    assert main(["binarize", "--model", "tiny-llama", "--recipe", "blockwise", "--out", "x"]) == 2
    assert "--time-budget SECONDS" in capsys.readouterr().err


def test_distill_starts_no_step_past_its_deadline_and_keeps_a_checkpoint(tmp_path):
    import time

    from squeezegen.quant.distill import DistillConfig, distill

    teacher, student, _ = _pair()
    blocks = _blocks(teacher.config.vocab_size)
    config = DistillConfig(steps=50, batch=2, block=24, bf16="off", checkpointing=False, save_every=100)
    history = distill(student, teacher, blocks, config, tmp_path, stop_at=time.perf_counter())
    assert len(history) == 1  # the first step runs, then the deadline ends the run
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 1


def test_the_end_to_end_recipe_in_a_budget_trains_no_block(tmp_path):
    from squeezegen.quant.distill import DistillConfig
    from squeezegen.quant.recipe import BudgetRecipe, train_in_budget

    teacher, student, _ = _pair()
    before = copy.deepcopy(student)
    e2e = DistillConfig(batch=2, block=24, bf16="off", checkpointing=False, loss="kl", lr=1e-3)
    recipe = BudgetRecipe(seconds=10.0, block_share=0.0, end_to_end=e2e)
    result = train_in_budget(student, teacher, _blocks(teacher.config.vocab_size), recipe, tmp_path)
    assert result["blocks"] == [] and not (tmp_path / "blocks").exists()
    assert result["steps"] > 0 and len(result["end_to_end"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), before.parameters(), strict=True))


def test_the_budget_recipe_runs_both_stages_and_a_resume_redoes_nothing(tmp_path):
    from squeezegen.quant.distill import DistillConfig
    from squeezegen.quant.recipe import BudgetRecipe, train_in_budget

    teacher, student, _ = _pair()
    before = copy.deepcopy(student)
    blocks = _blocks(teacher.config.vocab_size)
    e2e = DistillConfig(batch=2, block=24, bf16="off", checkpointing=False, loss="kl", lr=1e-4)
    blockwise = BlockwiseConfig(seconds=1.0, batch=2, min_steps=5)
    recipe = BudgetRecipe(seconds=12.0, block_share=0.1, blocks=blockwise, end_to_end=e2e)
    run = {"model": "tiny-llama"}
    result = train_in_budget(student, teacher, blocks, recipe, tmp_path, run=run)
    assert len(result["blocks"]) == 4 and result["steps"] > 0
    assert 0 < len(result["end_to_end"]) <= result["steps"]  # the deadline may end it a step early
    state = json.loads((tmp_path / "recipe.json").read_text())
    assert state["done"] and state["steps"] == result["steps"]

    again = copy.deepcopy(before)
    resumed = train_in_budget(again, teacher, blocks, recipe, tmp_path, resume=True, run=run)
    assert resumed["blocks"] == result["blocks"] and resumed["steps"] == result["steps"]
    for a, b in zip(again.parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b)  # the blocks loaded, the end-to-end stage's last checkpoint loaded
    with pytest.raises(SqueezegenError, match="other settings"):
        train_in_budget(copy.deepcopy(before), teacher, blocks, recipe, tmp_path, resume=True, run={"model": "x"})


def test_without_rulers_data_the_held_out_set_is_the_bundled_corpus(monkeypatch):
    from squeezegen.errors import MissingDependencyError
    from squeezegen.evals import training_text

    def missing(part):
        raise MissingDependencyError("the essays text ships with RULER's data")

    monkeypatch.setattr(training_text, "essays", missing)
    _, tok = sg.load("tiny-llama", dtype="float32")
    assert list(training_text.held_out_blocks(tok, 64)) == ["cpython-docs"]
