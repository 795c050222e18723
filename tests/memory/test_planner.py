"""The planner: fastest settings that fit, user settings untouched, a clear error with what would fit."""

import pytest

from slimtune.errors import ConfigError
from slimtune.memory.planner import (
    MemoryBudgetError,
    longest_context,
    plan_memory,
    predict,
    with_settings,
)

GIB = 2**30


def test_a_generous_budget_changes_nothing_and_a_tight_one_turns_techniques_on_in_cost_order():
    roomy = plan_memory("e2b", 2048, 80 * GIB)
    assert roomy.fits and roomy.changes == {}
    assert roomy.settings["load_in_4bit"] is False  # the fastest start: 16-bit weights
    assert roomy.settings["gradient_checkpointing"] is False  # ... and no recompute
    # without checkpointing the estimate is unmeasured: such a plan keeps a margin of the budget free
    just_enough = plan_memory("e2b", 2048, int(roomy.predicted_bytes * 1.05), load_in_4bit=False)
    assert just_enough.settings["gradient_checkpointing"] is True
    tight = plan_memory("e2b", 8192, 4 * GIB)
    assert tight.fits and tight.predicted_bytes <= 4 * GIB
    assert tight.settings["load_in_4bit"] is True  # the cheapest technique is taken first
    assert tight.settings["optimizer"] == "adamw"  # the costliest one was not needed
    # every technique the plan took was needed: undoing the last-needed boolean one breaks the budget
    assert not with_settings(tight, activation_offload=False).fits


def test_explicit_settings_are_never_overridden():
    plan = plan_memory("e2b", 8192, 6.5 * GIB, load_in_4bit=False, gradient_checkpointing=True)
    assert plan.settings["load_in_4bit"] is False and "load_in_4bit" not in plan.changes
    assert plan.fits
    with pytest.raises(MemoryBudgetError) as info:
        plan_memory("e2b", 8192, 5 * GIB, load_in_4bit=False, optimizer="adamw", activation_offload=False,
                    mlp_chunk_size=0)
    assert info.value.plan.settings["load_in_4bit"] is False
    assert "load_in_4bit" in str(info.value)  # named among the settings left alone


def test_micro_batch_split_keeps_the_effective_batch_unless_grad_accum_is_pinned():
    plan = plan_memory("e2b", 8192, 5 * GIB, batch_size=4)
    s = plan.settings
    assert s["batch_size"] < 4 and s["batch_size"] * s["grad_accum"] == 4 and plan.fits
    assert any("effective batch" in note for note in plan.notes)
    pinned = plan_memory("e2b", 8192, 12 * GIB, batch_size=4, grad_accum=1)
    assert pinned.settings["batch_size"] == 4 and pinned.settings["grad_accum"] == 1


def test_nothing_fits_names_the_smallest_peak_and_the_longest_context_that_fits():
    with pytest.raises(MemoryBudgetError) as info:
        plan_memory("e2b", 131072, 3 * GIB)
    err = info.value
    assert isinstance(err, ConfigError)  # the CLI prints it as a clear error
    assert err.plan.predicted_bytes > 3 * GIB
    assert f"{err.plan.predicted_bytes / GIB:.2f} GiB" in str(err)
    assert 0 < err.longest_seq < 131072 and str(err.longest_seq) in str(err)
    assert err.longest_seq % 128 == 0  # a length people would set
    assert plan_memory("e2b", err.longest_seq, 3 * GIB).fits
    with pytest.raises(MemoryBudgetError):
        plan_memory("e2b", err.longest_seq + 128, 3 * GIB)


def test_longest_context_is_the_edge_of_what_fits():
    budget = 6 * GIB
    n = longest_context("e2b", budget, load_in_4bit=True)
    assert plan_memory("e2b", n, budget, load_in_4bit=True).fits
    with pytest.raises(MemoryBudgetError):
        plan_memory("e2b", n + 1, budget, load_in_4bit=True)
    aligned = longest_context("e2b", budget, load_in_4bit=True, multiple_of=1024)
    assert aligned % 1024 == 0 and n - 1024 < aligned <= n
    assert longest_context("e2b", 1 * GIB) == 0  # the weights alone do not fit
    assert longest_context("e2b", 10_000 * GIB) == 131072  # bounded by the position limit


def test_more_memory_never_means_a_shorter_context():
    lengths = [longest_context("e2b", gib * GIB, multiple_of=256) for gib in (3, 4, 6, 8, 12)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


def test_predict_reports_the_main_terms_of_the_given_settings():
    plan = predict("e2b", 8192, load_in_4bit=True)
    assert plan.budget_bytes is None and plan.fits
    names = [name for name, _ in plan.main_terms()]
    assert "weights" in names and "layer_working_set" in names
    assert f"{plan.predicted_gib:.2f} GiB" in plan.summary()


@pytest.mark.parametrize("bad", [dict(budget_bytes=0), dict(budget_bytes=-5), dict(budget_bytes="8GiB"),
                                 dict(budget_bytes=8 * GIB, warp_drive=True)])
def test_bad_arguments_are_refused(bad):
    budget = bad.pop("budget_bytes")
    with pytest.raises(ValueError):
        plan_memory("e2b", 2048, budget, **bad)


def test_text_only_counts_only_the_language_model_of_a_multimodal_checkpoint(tiny_dir):
    folder = tiny_dir("e2b", text_only=False)
    full = predict(folder, 256, load_in_4bit=False)
    text = predict(folder, 256, load_in_4bit=False, text_only=True)
    assert text.predicted_bytes < full.predicted_bytes  # the towers' weights are not loaded
    same = predict(tiny_dir("e2b", text_only=True), 256, load_in_4bit=False)
    assert text.predicted_bytes == same.predicted_bytes  # exactly what a text-only checkpoint of that decoder needs


def test_recompute_norms_halves_the_norm_terms_and_lengthens_the_context():
    """RMSNorms saving 16-bit inputs instead of fp32 copies: a smaller layer working set, a longer context."""
    from slimtune.memory.planner import longest_context, predict

    fp32 = predict("e2b", 8192, load_in_4bit=True, recompute_norms=False)
    lean = predict("e2b", 8192, load_in_4bit=True)  # the default
    assert lean.predicted_bytes == predict("e2b", 8192, load_in_4bit=True, recompute_norms=True).predicted_bytes
    assert lean.breakdown["weights"] == fp32.breakdown["weights"]
    assert lean.predicted_gib < fp32.predicted_gib - 0.1
    budget = 8 * 2**30
    assert longest_context("e2b", budget, load_in_4bit=True, recompute_norms=True, multiple_of=1024) > \
        longest_context("e2b", budget, load_in_4bit=True, recompute_norms=False, multiple_of=1024)


def test_checkpoint_layers_spans_checkpointing_all_layers_to_none():
    """checkpoint_layers=k: k layers keep only their input, the others everything; k = all is the default plan,
    k = 0 saves what no checkpointing saves, and each layer not recomputed adds memory."""
    from slimtune.memory.planner import UNMEASURED_MARGIN, predict

    layers = 35  # E2B's decoder
    every = predict("e2b", 8192, load_in_4bit=True)
    assert predict("e2b", 8192, load_in_4bit=True, checkpoint_layers=layers).predicted_bytes == every.predicted_bytes
    peaks = [predict("e2b", 8192, load_in_4bit=True, checkpoint_layers=k).predicted_bytes
             for k in (layers, 30, 17, 0)]
    assert peaks == sorted(peaks) and len(set(peaks)) == 4
    none = predict("e2b", 8192, load_in_4bit=True, checkpoint_layers=0)
    off = predict("e2b", 8192, load_in_4bit=True, gradient_checkpointing=False)
    assert none.breakdown["saved_activations"] == off.breakdown["saved_activations"]
    assert none.breakdown["checkpointed_activations"] == 0
    # the mix is calibrated on the H200 (session 8); turning checkpointing off is not
    assert every.margin == 1.0 and none.margin == 1.0 and off.margin == UNMEASURED_MARGIN


def test_planner_recomputes_only_as_many_layers_as_the_budget_needs():
    from slimtune.memory.planner import plan_memory, predict

    every = predict("e2b", 4096, load_in_4bit=True).predicted_bytes
    none = predict("e2b", 4096, load_in_4bit=True, gradient_checkpointing=False).predicted_bytes
    budget = int(every + (none - every) / 2)  # room for about half the layers' activations
    plan = plan_memory("e2b", 4096, budget, load_in_4bit=True)
    k = plan.settings["checkpoint_layers"]
    assert plan.fits and plan.settings["gradient_checkpointing"] and 0 < k < 35, plan.summary()
    assert plan.changes["checkpoint_layers"] == (None, k) and "first %d decoder layers" % k in plan.summary()
    fewer = predict("e2b", 4096, load_in_4bit=True, checkpoint_layers=k - 1)
    assert fewer.predicted_bytes > budget  # k is the fewest that fits
    # a budget the all-layers plan only just fits keeps every layer checkpointed; a fixed value is kept
    assert plan_memory("e2b", 4096, int(every) + 1, load_in_4bit=True).settings["checkpoint_layers"] is None
    fixed = plan_memory("e2b", 4096, budget, load_in_4bit=True, checkpoint_layers=30)
    assert fixed.settings["checkpoint_layers"] == 30 and "checkpoint_layers" not in fixed.changes


def test_train_config_gets_the_planned_checkpoint_layers():
    from slimtune.memory.planner import predict
    from slimtune.memory.train_plan import apply_memory_plan
    from slimtune.train.config import TrainConfig

    every = predict("e2b", 4096, load_in_4bit=True).predicted_bytes
    none = predict("e2b", 4096, load_in_4bit=True, gradient_checkpointing=False).predicted_bytes
    budget_mib = int((every + (none - every) / 2) / 2**20)
    cfg = TrainConfig(model="e2b", data="d", output="o", load_in_4bit=True, max_seq_length=4096,
                      max_memory=f"{budget_mib}MiB", device="cuda")
    lines = []
    planned = apply_memory_plan(cfg, log=lines.append, world_size=1)
    assert planned.gradient_checkpointing and 0 < planned.checkpoint_layers < 35, lines
    assert any(f"checkpoint_layers={planned.checkpoint_layers} (was None)" in line for line in lines), lines
