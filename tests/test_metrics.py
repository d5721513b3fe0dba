"""Predictive metrics against hand-computed values and an independent oracle (torchmetrics)."""

import math

import pytest
import torch

from bora.evaluation.metrics import (SampleAverager, TokenMetrics, brier, entropy, expected_calibration_error,
                                     log_mean_exp,
                          mutual_information)


def _old_mi_float64(log_probs):
    """The previous definition H(mean_s p_s) - mean_s H(p_s), evaluated in float64 without a clamp."""
    p = log_probs.double().exp()
    return entropy(p.mean(0)) - entropy(p, log_probs.double()).mean(0)


def test_mutual_information_hand_example():
    lp = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).log()  # two certain, disagreeing samples: MI = log 2
    assert mutual_information(lp).item() == pytest.approx(math.log(2.0), abs=1e-15)
    lp = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64).log()  # p_bar = (0.7, 0.3)
    kl1 = 0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)
    kl2 = 0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    assert mutual_information(lp).item() == pytest.approx((kl1 + kl2) / 2, rel=1e-14)
    same = torch.log_softmax(torch.randn(1, 3, 11), -1).expand(6, 3, 11)
    assert torch.equal(mutual_information(same), torch.zeros(3, dtype=torch.float64))  # exactly 0
    assert mutual_information(lp).dtype == torch.float64


def test_mutual_information_equals_the_entropy_difference_in_float64():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(5, 4, 7, 50, generator=g, dtype=torch.float64), -1)
    mi = mutual_information(lp)
    assert mi.shape == (4, 7) and torch.all(mi > 0)
    torch.testing.assert_close(mi, _old_mi_float64(lp), rtol=1e-10, atol=1e-13)
    acc = SampleAverager()
    for s in range(5):
        acc.add(lp[s].float())  # float32 inputs, float64 sums
    torch.testing.assert_close(acc.mutual_information(), mutual_information(lp.float()), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(acc.entropy(), acc.expected_entropy() + acc.mutual_information())
    torch.testing.assert_close(acc.probs(), lp.float().double().exp().mean(0))


def test_tiny_mutual_information_is_not_round_off():
    """Samples differing by 1e-4 in the logits over a 49k vocabulary: MI ~ 1e-9 nats.

    For nearby samples MI = mean_s KL(p_s || p_bar) ~ 1/2 mean_s sum_v (p_s - p_bar)^2 / p_bar (the
    chi-square approximation); the float32 entropy difference is ~1e-6 of noise here."""
    g = torch.Generator().manual_seed(1)
    V, S = 49152, 4
    z = 2 * torch.randn(V, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(z + 1e-4 * torch.randn(S, V, generator=g, dtype=torch.float64), -1)
    p = lp.exp()
    p_bar = p.mean(0)
    chi2 = 0.5 * ((p - p_bar).square() / p_bar).sum(-1).mean()
    mi = mutual_information(lp)
    assert 1e-11 < float(chi2) < 1e-7
    assert float(mi) == pytest.approx(float(chi2), rel=1e-3)
    old32 = entropy(p.float().mean(0)) - entropy(p.float(), lp.float()).mean(0)  # the float32 difference
    assert abs(float(old32) - float(chi2)) > 10 * abs(float(mi) - float(chi2))


def test_ece_and_brier_match_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional")
    g = torch.Generator().manual_seed(2)
    V, n = 9, 3000
    probs = torch.softmax(2.5 * torch.randn(n, V, generator=g), -1)
    labels = torch.multinomial(torch.softmax(torch.randn(n, V, generator=g), -1), 1, generator=g).squeeze(-1)
    conf, top = probs.max(-1)
    for bins in (1, 10, 15):
        want = float(tm.classification.multiclass_calibration_error(probs, labels, num_classes=V, n_bins=bins,
                                                                      norm="l1"))
        assert expected_calibration_error(conf, top == labels, n_bins=bins) == pytest.approx(want, abs=1e-6)
    onehot = torch.nn.functional.one_hot(labels, V).float()
    want_brier = float(tm.mean_squared_error(probs, onehot)) * V  # mean over tokens of sum_v (p_v - y_v)^2
    assert float(brier(probs, labels).mean()) == pytest.approx(want_brier, rel=1e-5)
    m = TokenMetrics(n_bins=15)
    for chunk in torch.arange(n).split(700):  # streaming over batches gives the same numbers
        m.add(probs[chunk], labels[chunk])
    r = m.result()
    assert r["brier"] == pytest.approx(want_brier, rel=1e-5)
    assert r["ece"] == pytest.approx(float(tm.classification.multiclass_calibration_error(
        probs, labels, num_classes=V, n_bins=15)), abs=1e-6)
    assert r["accuracy"] == pytest.approx(float(tm.classification.multiclass_accuracy(
        probs, labels, num_classes=V, average="micro")), abs=1e-7)
    assert r["nll"] == pytest.approx(float(torch.nn.functional.nll_loss(probs.log(), labels)), rel=1e-5)


def test_log_mean_exp():
    assert log_mean_exp(torch.tensor([0.0, math.log(3.0)])).item() == pytest.approx(math.log(2.0))
    x = torch.tensor([[-1000.0, -1001.0]], dtype=torch.float64)  # stable far below exp's range
    assert log_mean_exp(x, 1).item() == pytest.approx(-1000.0 + math.log((1 + math.exp(-1)) / 2))


def test_ece_on_a_hand_made_example():
    conf = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55, 0.25, 0.25])
    hit = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    # bins: 0.95 -> acc 0.75 (|0.2| x 4), 0.55 -> acc 0.5 (|0.05| x 2), 0.25 -> acc 0 (|0.25| x 2)
    want = (4 * 0.2 + 2 * 0.05 + 2 * 0.25) / 8
    assert expected_calibration_error(conf, hit, n_bins=15) == pytest.approx(want)
    # perfectly calibrated bins give 0; one bin holds everything when n_bins=1
    assert expected_calibration_error(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == pytest.approx(0.0)
    assert expected_calibration_error(conf, hit, n_bins=1) == pytest.approx(abs(conf.mean() - hit.float().mean()))
    # right-closed bins: a confidence exactly on an edge goes to the lower bin
    assert expected_calibration_error(torch.tensor([0.25, 0.26]), torch.tensor([False, True]),
                                      n_bins=4) == pytest.approx((0.25 + 0.74) / 2, abs=1e-6)


def test_brier_and_entropy():
    labels = torch.tensor([2, 0, 1])
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    assert torch.equal(brier(onehot, labels), torch.zeros(3))
    probs = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1)
    torch.testing.assert_close(brier(probs, labels), (probs - onehot).square().sum(-1))
    assert brier(torch.tensor([[0.0, 1.0]]), torch.tensor([0])).item() == pytest.approx(2.0)
    assert entropy(torch.full((5,), 0.2)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([1.0, 0.0])).item() == 0.0
    m = TokenMetrics()
    m.add(onehot, labels)
    r = m.result()
    assert r["nll"] == 0.0 and r["accuracy"] == 1.0 and r["brier"] == 0.0 and r["ece"] == 0.0
