"""The recommendation (fewest parameters within tolerance of the best), the grid's
parsing, and SweepConfig's validation: pure, on hand-made rows."""

import pytest

from loratree.sweep import SweepConfig, SweepRow, parse_ranks, parse_target_sets, recommend


def _row(name, params, em, loss=1.0, error=None, rank=1):
    return SweepRow(name, name.split()[0], rank, params, 4 * params, loss, em, 0.1, "out",
                    error)


def test_the_smallest_config_within_tolerance_wins():
    rows = [_row("a r=1", 100, 0.40), _row("a r=2", 200, 0.48), _row("b r=1", 300, 0.50),
            _row("full", 10_000, 0.50, rank=None)]
    # best 0.50; 0.48 is exactly 2 points below: within (the edge counts)
    assert recommend(rows, 2.0).name == "a r=2"
    assert recommend(rows, 1.99).name == "b r=1"
    assert recommend(rows, 10.0).name == "a r=1"
    assert recommend(rows, 0.0).name == "b r=1"  # full ties on EM, has more parameters


def test_tolerance_edge_with_thirds():
    # exact matches are k/n fractions: 29/30 vs 30/30 is 3.33 points apart
    rows = [_row("small", 10, 29 / 30), _row("big", 20, 30 / 30)]
    assert recommend(rows, 10 / 3).name == "small"
    assert recommend(rows, 3.3).name == "big"


def test_ties_in_parameters_go_to_exact_match_then_loss_then_order():
    rows = [_row("x r=1", 100, 0.90, loss=0.5), _row("y r=1", 100, 0.95, loss=0.9),
            _row("z r=1", 100, 0.95, loss=0.3), _row("w r=1", 100, 0.95, loss=0.3)]
    assert recommend(rows, 10.0).name == "z r=1"
    assert recommend(rows[:2], 10.0).name == "y r=1"


def test_stopped_or_unscored_rows_are_skipped():
    rows = [_row("nan r=1", 10, 1.0, error="step 3: the loss is not finite"),
            _row("none r=1", 20, None), _row("ok r=2", 30, 0.2)]
    assert recommend(rows, 2.0).name == "ok r=2"
    assert recommend(rows[:2], 2.0) is None
    assert recommend([], 2.0) is None


def test_full_fine_tuning_when_nothing_else_comes_close():
    rows = [_row("a r=1", 100, 0.10), _row("full fine-tuning", 10_000, 0.90, rank=None)]
    assert recommend(rows, 2.0).full


def test_parse_target_sets_and_ranks():
    sets = parse_target_sets("q,v; attention ;up_proj,down_proj;;all-linear")
    assert sets == (("q,v", ("q_proj", "v_proj")),
                    ("attention", ("q_proj", "k_proj", "v_proj", "o_proj")),
                    ("up_proj,down_proj", ("up_proj", "down_proj")),
                    ("all-linear", ("all-linear",)))
    assert parse_ranks("1, 2,4,") == (1, 2, 4)
    with pytest.raises(ValueError, match="'x'"):
        parse_ranks("1,x")


@pytest.mark.parametrize(("kw", "field"), [
    ({"ranks": ()}, "ranks"),
    ({"ranks": (1, 0)}, "ranks"),
    ({"ranks": (2, 2)}, "ranks repeat"),
    ({"tolerance": -1.0}, "tolerance"),
    ({"steps": 0}, "steps"),
    ({"lr": 0.0}, "lr"),
    ({"full_lr": float("nan")}, "full_lr"),
    ({"eval_data": ""}, "eval_data"),
    ({"target_sets": ()}, "target_sets"),
    ({"target_sets": (("a", ()),)}, "no target patterns"),
    ({"target_sets": (("a,b", ("x",)), ("a-b", ("y",)))}, "must differ"),
    ({"rows_per_pass": -1}, "rows_per_pass"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SweepConfig(**{"data": "t.jsonl", "eval_data": "e.jsonl", **kw})


def test_config_defaults_and_policies():
    c = SweepConfig(data="t.jsonl", eval_data="e.jsonl", steps=30, target_sets=[["q", ["q_proj"]]])
    assert c.target_sets == (("q", ("q_proj",)),)
    assert c.warmup_steps == 3 and c.alpha(8) == 16.0 and c.tolerance == 2.0
    assert c.to_dict()["ranks"] == (1, 2, 4, 8, 16, 32)
