import pytest
import torch

from squeezegen.errors import SqueezegenError
from squeezegen.runtime.sampling import Sampler

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])


def draws(sampler, n=400):
    return torch.stack([sampler(LOGITS.expand(4, -1)) for _ in range(n // 4)]).flatten()


def test_greedy_is_argmax():
    assert Sampler()(LOGITS).tolist() == [4]


def test_top_k_limits_the_choices():
    assert set(draws(Sampler(temperature=1.0, top_k=2, seed=0)).tolist()) == {0, 4}
    assert set(draws(Sampler(temperature=5.0, top_k=1, seed=0)).tolist()) == {4}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)[0]  # 4: 0.61, 0: 0.22, 1: 0.08, 2: 0.05, 3: 0.01
    assert probs[4] < 0.7 < probs[4] + probs[0]
    assert set(draws(Sampler(temperature=1.0, top_p=0.7, seed=0)).tolist()) == {0, 4}
    assert set(draws(Sampler(temperature=1.0, top_p=0.5, seed=0)).tolist()) == {4}


def test_seed_reproduces_and_full_sampling_reaches_every_token():
    a = draws(Sampler(temperature=2.0, seed=7), n=800)
    b = draws(Sampler(temperature=2.0, seed=7), n=800)
    assert torch.equal(a, b)
    assert set(a.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_parameters(kwargs):
    with pytest.raises(SqueezegenError):
        Sampler(**kwargs)
