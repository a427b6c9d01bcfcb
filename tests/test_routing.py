import math

import pytest
import torch

from remix import routing

# A 3-way router with q = (0.5, 0.3, 0.2): logits log q are already normalised.
Q = torch.tensor([0.5, 0.3, 0.2])
LOGITS = Q.log()

# Plackett–Luce probability of each ordered pair (i, j), k = 2:  Q(i, j) = q_i * q_j / (1 - q_i)
#   (0,1) .5*.3/.5 = .3        (0,2) .5*.2/.5 = .2
#   (1,0) .3*.5/.7 = .2142857  (1,2) .3*.2/.7 = .0857143
#   (2,0) .2*.5/.8 = .125      (2,1) .2*.3/.8 = .075          sum = 1
PAIR_PROB = {
    (0, 1): 0.3, (0, 2): 0.2, (1, 0): 0.3 * 0.5 / 0.7, (1, 2): 0.3 * 0.2 / 0.7, (2, 0): 0.125, (2, 1): 0.075,
}


def test_pair_probabilities_sum_to_one():
    assert sum(PAIR_PROB.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("pair", sorted(PAIR_PROB))
def test_log_q_matches_hand_derivation(pair):
    # log Q((1, 0)) = log .3 + log(.5 / (1 - .3)) = -1.2040 - 0.3365 = -1.5404, etc.
    got = routing.plackett_luce_log_prob(torch.log_softmax(LOGITS, -1), torch.tensor(pair))
    assert float(got) == pytest.approx(math.log(PAIR_PROB[pair]), abs=1e-6)


def test_log_q_is_invariant_to_logit_shift_and_batched():
    idx = torch.tensor([[1, 0], [2, 1]])
    logits = torch.stack([LOGITS, LOGITS]) + torch.tensor([[3.0], [-7.0]])
    got = routing.plackett_luce_log_prob(torch.log_softmax(logits, -1), idx)
    want = torch.tensor([math.log(PAIR_PROB[(1, 0)]), math.log(PAIR_PROB[(2, 1)])])
    torch.testing.assert_close(got, want)


def test_log_q_stays_finite_when_router_is_peaked():
    # q_0 = 1 - 2e-18 in float32 rounds to 1: log1p(-cumsum) would give -inf; log-sum-exp does not.
    logits = torch.tensor([[40.0, 0.0, 0.0]])
    got = routing.plackett_luce_log_prob(torch.log_softmax(logits, -1), torch.tensor([[0, 1]]))
    # log q_0 ~ 0, then the two remaining LoRAs are equally likely: log(1/2)
    assert float(got) == pytest.approx(math.log(0.5), abs=1e-5)


def test_sampling_frequencies_match_plackett_luce():
    # 40,000 draws; the std of a frequency is at most sqrt(.25/40000) = .0025, so .01 is > 4 sigma.
    draws = 40_000
    gen = torch.Generator().manual_seed(1234)
    idx, log_q = routing.sample_without_replacement(LOGITS.expand(draws, 3), 2, generator=gen)
    assert idx.shape == (draws, 2) and log_q.shape == (draws,)
    assert (idx[:, 0] != idx[:, 1]).all()
    for pair, prob in PAIR_PROB.items():
        hit = (idx[:, 0] == pair[0]) & (idx[:, 1] == pair[1])
        assert float(hit.float().mean()) == pytest.approx(prob, abs=0.01), pair
        # the returned log Q is the log-probability of the pair that was drawn
        assert torch.allclose(log_q[hit], torch.tensor(math.log(prob)), atol=1e-5)


def test_sampling_gradient_reaches_logits_only_through_log_q():
    logits = LOGITS.clone().expand(4, 3).contiguous().requires_grad_()
    _, log_q = routing.sample_without_replacement(logits, 2, generator=torch.Generator().manual_seed(0))
    log_q.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # d log Q / d logits sums to zero per row (softmax is shift-invariant)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(4), atol=1e-6, rtol=0)


def test_topk_ties_go_to_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert routing.topk_lower_index(scores, 2).tolist() == [[1, 2], [0, 1]]
    # deterministic: the same answer every time, on a big batch of ties too
    big = torch.zeros(1000, 8)
    assert (routing.topk_lower_index(big, 3) == torch.tensor([0, 1, 2])).all()


def test_topk_agrees_with_softmax_topk():
    logits = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(routing.topk_lower_index(logits, 2), routing.topk_lower_index(routing.router_probs(logits), 2))


def test_ess():
    # equal weights on k entries: ESS = (k w)^2 / (k w^2) = k ; one entry: 1 ; (.9, .1): 1 / .82 = 1.2195
    w = torch.tensor([[0.25, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.0, 0.0]])
    torch.testing.assert_close(routing.ess(w), torch.tensor([2.0, 1.0, 1 / 0.82]))


def test_selection_entropy():
    assert routing.selection_entropy(torch.tensor([5, 0, 0])) == (0.0, 1.0)
    h, eff = routing.selection_entropy(torch.tensor([3, 3, 3, 3]))
    assert h == pytest.approx(math.log(4)) and eff == pytest.approx(4.0)
    # p = (.5, .25, .25): H = .5 log 2 + 2 * .25 log 4 = 1.5 log 2 ; exp(H) = 2^1.5 = 2.828
    h, eff = routing.selection_entropy(torch.tensor([2, 1, 1]))
    assert eff == pytest.approx(2 ** 1.5)
    assert routing.selection_entropy(torch.zeros(3)) == (0.0, 0.0)
