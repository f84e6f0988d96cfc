import math

import pytest
import torch

from loratree.ops.sampling import filter_logits, sample


def _naive_keep(logits, temperature, top_k, top_p):
    """The kept token set by the definition: sort by probability, take the top k, then the
    shortest prefix whose mass reaches top_p."""
    probs = [math.exp(v / temperature) for v in logits.tolist()]
    total = sum(probs)
    ranked = sorted(range(len(probs)), key=lambda i: -probs[i])
    if top_k:
        ranked = ranked[:top_k]
    kept_mass = sum(probs[i] for i in ranked) / total
    keep, mass = [], 0.0
    for i in ranked:
        keep.append(i)
        mass += probs[i] / total / kept_mass
        if mass >= top_p:
            break
    return set(keep)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"),
                         [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8)])
def test_filter_keeps_exactly_the_naive_set(temperature, top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    x = filter_logits(logits, temperature, top_k, top_p)
    kept = {i for i, v in enumerate(x.tolist()) if v != float("-inf")}
    if top_k and top_p < 1.0:  # top-p over the renormalised top-k set, as here
        assert kept <= _naive_keep(logits, temperature, top_k, 1.0)
    else:
        assert kept == _naive_keep(logits, temperature, top_k, top_p)
    probs = x.softmax(-1)
    want = (logits / temperature).softmax(-1)
    for i in kept:  # kept tokens keep their relative odds
        assert math.isclose(probs[i] / probs[max(kept, key=lambda j: want[j])],
                            want[i] / want[max(kept, key=lambda j: want[j])], rel_tol=1e-5)


def test_greedy_and_extreme_temperatures():
    logits = torch.tensor([0.1, 3.0, -2.0, 2.9])
    assert sample(logits, 0.0) == 1
    for t in (1e-300, 1e-30, 1e-6):  # all mass on the argmax, no overflow to nan
        g = torch.Generator().manual_seed(0)
        assert all(sample(logits, t, generator=g) == 1 for _ in range(20))


def test_seeded_draws_repeat_and_follow_the_distribution():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.25, 0.75
    g = torch.Generator().manual_seed(7)
    draws = [sample(logits, 1.0, generator=g) for _ in range(4000)]
    g = torch.Generator().manual_seed(7)
    assert draws == [sample(logits, 1.0, generator=g) for _ in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.75) < 0.03
