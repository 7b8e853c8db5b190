"""curvkern.privacy: likelihood ratios against hand-computed Gaussians, the signals against their
definitions (and the Curvature Clues scale), and the exports against the toolkits' layouts."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from curvkern import CurvatureScorer, ops, privacy
from curvkern.metrics import auroc


def logpdf(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------
# likelihood_ratio


def test_online_ratio_by_hand():
    # 5 shadow models, 2 samples. Sample 0 is in models 0, 1, 2; sample 1 in models 3, 4.
    scores = np.array([[1.0, 4.0], [2.0, 6.0], [4.0, 0.0], [9.0, 3.0], [7.0, 5.0]])
    keep = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    target = np.array([3.0, 1.0])
    # sample 0: in {1, 2, 4}: median 2, std sqrt(14/9); out {9, 7}: median 8, std 1
    # sample 1: in {3, 5}: median 4, std 1; out {4, 6, 0}: median 4, std sqrt(56/9)
    expected = [
        logpdf(3.0, 2.0, math.sqrt(14 / 9)) - logpdf(3.0, 8.0, 1.0),
        logpdf(1.0, 4.0, 1.0) - logpdf(1.0, 4.0, math.sqrt(56 / 9)),
    ]
    got = privacy.likelihood_ratio(scores, keep, target)
    assert got.dtype == torch.float64 and got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # the mean as location (Curvature Clues): sample 0 in 7/3, out 8; sample 1 in 4, out 10/3
    got = privacy.likelihood_ratio(scores, keep, target, center="mean")
    expected = [
        logpdf(3.0, 7 / 3, math.sqrt(14 / 9)) - logpdf(3.0, 8.0, 1.0),
        logpdf(1.0, 4.0, 1.0) - logpdf(1.0, 10 / 3, math.sqrt(56 / 9)),
    ]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # tensors in, bool or 0/1 keep: same numbers
    again = privacy.likelihood_ratio(torch.tensor(scores), torch.tensor(keep.astype(int)), target)
    torch.testing.assert_close(again, privacy.likelihood_ratio(scores, keep, target))


def test_fix_variance_pools_within_sample_variances():
    scores = np.array([[1.0, 4.0], [2.0, 6.0], [4.0, 0.0], [9.0, 3.0], [7.0, 5.0]])
    keep = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    target = np.array([3.0, 1.0])
    # in: squared deviations 14/3 (sample 0, 3 models) + 2 (sample 1, 2 models) over 5 scores
    sd_in = math.sqrt((14 / 3 + 2) / 5)
    # out: 2 (sample 0, 2 models) + 56/3 (sample 1, 3 models) over 5 scores
    sd_out = math.sqrt((2 + 56 / 3) / 5)
    expected = [
        logpdf(3.0, 2.0, sd_in) - logpdf(3.0, 8.0, sd_out),
        logpdf(1.0, 4.0, sd_in) - logpdf(1.0, 4.0, sd_out),
    ]
    got = privacy.likelihood_ratio(scores, keep, target, fix_variance=True)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_offline_one_sided_and_two_sided():
    stats = pytest.importorskip("scipy.stats", reason="normal tails from SciPy")
    scores = np.array([[1.0, 4.0], [2.0, 6.0], [4.0, 0.0], [9.0, 3.0], [7.0, 5.0]])
    keep = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    target = np.array([30.0, -1.0])  # sample 0 far above its out scores: tails matter
    loc, sd = np.array([8.0, 4.0]), np.array([1.0, math.sqrt(56 / 9)])
    cases = {
        "greater": -stats.norm.logsf(target, loc, sd),  # -log P[Z >= t]
        "less": -stats.norm.logcdf(target, loc, sd),
        "two-sided": -stats.norm.logpdf(target, loc, sd),
    }
    for alternative, expected in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the direction check; tested below
            got = privacy.likelihood_ratio(
                scores, keep, target, online=False, alternative=alternative
            )
        torch.testing.assert_close(got, torch.from_numpy(expected), rtol=1e-12, atol=0)
    # at 22 standard deviations 1 - Phi(z) is 0 in float64; -log P keeps ranking there
    assert math.isfinite(cases["greater"][0]) and cases["greater"][0] > 200


def test_offline_needs_no_in_models_and_warns_on_a_reversed_signal():
    rng = np.random.default_rng(0)
    out_only = rng.normal(size=(6, 4))
    none_in = np.zeros((6, 4), dtype=bool)
    got = privacy.likelihood_ratio(out_only, none_in, np.zeros(4), online=False)
    assert torch.isfinite(got).all()
    # members score lower (as a loss): "greater" is the wrong side, and the warning says so
    keep = rng.random((40, 50)) < 0.5
    loss = rng.normal(size=(40, 50)) - 3.0 * keep
    with pytest.warns(UserWarning, match="alternative='less' applies"):
        privacy.likelihood_ratio(loss, keep, np.zeros(50), online=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        privacy.likelihood_ratio(loss, keep, np.zeros(50), online=False, alternative="less")


def test_queries_average_the_per_query_ratios():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(12, 5, 3))
    keep = rng.random((12, 5)) < 0.5
    keep[:2], keep[2:4] = True, False  # at least 2 in and 2 out everywhere
    target = rng.normal(size=(5, 3))
    for online in (True, False):
        got = privacy.likelihood_ratio(scores, keep, target, online=online)
        per_query = [
            privacy.likelihood_ratio(scores[..., a], keep, target[:, a], online=online)
            for a in range(3)
        ]
        torch.testing.assert_close(got, torch.stack(per_query).mean(0))


def test_converges_to_the_true_log_likelihood_ratio():
    """Many shadow models from known Gaussians: the fitted ratio approaches the true one.

    The tolerance is 5 standard errors of the estimate, from the delta method: the median of k
    normal draws has standard error sqrt(pi/2) sd/sqrt(k), the standard deviation sd/sqrt(2k).
    """
    rng = np.random.default_rng(2)
    k = 20_000  # in and out models per sample
    mu_in, sd_in = np.array([0.0, 1.0, -2.0]), np.array([1.0, 0.5, 2.0])
    mu_out, sd_out = np.array([1.0, 1.5, 0.0]), np.array([1.5, 0.5, 1.0])
    scores = np.concatenate(
        [rng.normal(mu_in, sd_in, size=(k, 3)), rng.normal(mu_out, sd_out, size=(k, 3))]
    )
    keep = np.repeat([[True], [False]], k, axis=0).repeat(3, axis=1)
    target = np.array([0.5, 1.2, -1.0])
    truth = np.array(
        [
            logpdf(t, a, b) - logpdf(t, c, d)
            for t, a, b, c, d in zip(target, mu_in, sd_in, mu_out, sd_out, strict=True)
        ]
    )
    got = privacy.likelihood_ratio(scores, keep, target).numpy()

    def sensitivity(t, mu, sd):  # d logpdf / d mu, d logpdf / d sd
        return (t - mu) / sd**2, -1 / sd + (t - mu) ** 2 / sd**3

    se = np.zeros(3)
    for mu, sd in ((mu_in, sd_in), (mu_out, sd_out)):
        g_mu, g_sd = sensitivity(target, mu, sd)
        se += (g_mu * math.sqrt(math.pi / 2) * sd / math.sqrt(k)) ** 2
        se += (g_sd * sd / math.sqrt(2 * k)) ** 2
    np.testing.assert_array_less(np.abs(got - truth), 5 * np.sqrt(se))


def test_separates_members_on_synthetic_data():
    """Per-sample in/out shifts drawn at random: the online ratio beats a global threshold."""
    rng = np.random.default_rng(3)
    m, n = 64, 2000
    base = rng.normal(0, 3, size=n)  # samples differ far more than members from non-members
    keep = rng.random((m, n)) < 0.5
    scores = base + keep + rng.normal(0, 0.5, size=(m, n))
    member = rng.random(n) < 0.5
    target = base + member + rng.normal(0, 0.5, size=n)
    ratio = privacy.likelihood_ratio(scores, keep, target)
    # Bayes-optimal AUROC for a unit shift with sd 0.5: Phi(1 / (0.5 sqrt 2)) = 0.921
    assert auroc(ratio, member) > 0.88
    assert auroc(target, member) < 0.65


def test_no_samples_give_an_empty_result():
    for fn in (privacy.likelihood_ratio, privacy.nll_ratio):
        got = fn(np.zeros((4, 0)), np.zeros((4, 0), dtype=bool), np.zeros(0))
        assert got.shape == (0,) and got.dtype == torch.float64


def test_one_sample_alone_equals_it_among_others():
    # Per-sample fits: a sample's ratio does not depend on the other samples (N = 1 included).
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(6, 3))
    keep = np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1], [0, 1, 0], [0, 0, 1]], bool)
    target = rng.normal(size=3)
    for fn in (privacy.likelihood_ratio, privacy.nll_ratio):
        every = fn(scores, keep, target)
        for n in range(3):
            alone = fn(scores[:, n : n + 1], keep[:, n : n + 1], target[n : n + 1])
            assert alone.shape == (1,)
            torch.testing.assert_close(alone, every[n : n + 1], rtol=1e-12, atol=0)


def test_zero_variance_warns_and_uses_lira_floor():
    scores = np.array([[1.0], [1.0], [2.0], [3.0]])
    keep = np.array([[True], [True], [False], [False]])
    with pytest.warns(UserWarning, match="standard deviation 0"):
        got = privacy.likelihood_ratio(scores, keep, np.array([1.5]))
    assert torch.isfinite(got).all()


def test_nll_ratio_by_hand():
    scores = np.array([[1.0, 4.0], [2.0, 6.0], [4.0, 0.0], [9.0, 3.0], [7.0, 5.0]])
    keep = np.array([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    target = np.array([3.0, 1.0])
    # means: in 7/3 and 4, out 8 and 10/3; in variances 14/9 and 1
    expected = [
        ((3 - 8) ** 2 - (3 - 7 / 3) ** 2) / (2 * 14 / 9),
        ((1 - 10 / 3) ** 2 - (1 - 4) ** 2) / (2 * 1.0),
    ]
    got = privacy.nll_ratio(scores, keep, target)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    # the same as the log ratio of two Gaussians sharing the in variance
    shared = [
        logpdf(3.0, 7 / 3, math.sqrt(14 / 9)) - logpdf(3.0, 8.0, math.sqrt(14 / 9)),
        logpdf(1.0, 4.0, 1.0) - logpdf(1.0, 10 / 3, 1.0),
    ]
    torch.testing.assert_close(got, torch.tensor(shared, dtype=torch.float64))


def test_errors_say_what_came_and_what_to_do():
    rng = np.random.default_rng(4)
    scores, keep, target = rng.normal(size=(6, 3)), rng.random((6, 3)) < 0.5, np.zeros(3)
    keep[:2], keep[2:4] = True, False
    with pytest.raises(ValueError, match=r"shadow_scores must have shape \(M, N\) or \(M, N, A\)"):
        privacy.likelihood_ratio(np.zeros(3), keep, target)
    with pytest.raises(ValueError, match=r"shadow_keep must have shape \(M, N\) = \(6, 3\)"):
        privacy.likelihood_ratio(scores, keep.T, target)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        privacy.likelihood_ratio(scores, keep * 2, target)
    with pytest.raises(ValueError, match=r"target_scores must have shape \(3,\)"):
        privacy.likelihood_ratio(scores, keep, np.zeros(4))
    with pytest.raises(ValueError, match=r"target_scores must have shape \(3, 2\)"):
        privacy.likelihood_ratio(np.zeros((6, 3, 2)), keep, np.zeros(3))
    bad = scores.copy()
    bad[4, 1] = np.nan
    with pytest.raises(
        ValueError, match=r"1 NaN or infinite values \(the first at .* = \(4, 1, 0\)"
    ):
        privacy.likelihood_ratio(bad, keep, target)
    with pytest.raises(ValueError, match="target_scores has 1 NaN"):
        privacy.likelihood_ratio(scores, keep, np.array([0.0, np.inf, 0.0]))
    never_in = keep.copy()
    never_in[:, 2] = False
    with pytest.raises(ValueError, match=r"sample 2\) have no shadow models that trained on them"):
        privacy.likelihood_ratio(scores, never_in, target, fix_variance=True)
    with pytest.raises(ValueError, match="use online=False"):
        privacy.likelihood_ratio(scores, never_in, target)
    privacy.likelihood_ratio(scores, never_in, target, online=False)  # offline: fine
    always_in = keep.copy()
    always_in[:, 0] = True
    with pytest.raises(ValueError, match="no shadow models that held them out") as info:
        privacy.likelihood_ratio(scores, always_in, target, online=False, fix_variance=True)
    assert "online=False" not in str(info.value)  # no out models: offline cannot help
    one_in = keep.copy()
    one_in[:, 1], one_in[0, 1] = False, True
    with pytest.raises(ValueError, match="fewer than 2.*fix_variance=True"):
        privacy.likelihood_ratio(scores, one_in, target)
    privacy.likelihood_ratio(scores, one_in, target, fix_variance=True)  # one each suffices
    with pytest.raises(ValueError, match="alternative must be one of"):
        privacy.likelihood_ratio(scores, keep, target, online=False, alternative="higher")
    with pytest.raises(ValueError, match="center must be one of"):
        privacy.nll_ratio(scores, keep, target, center="mode")


# ----------------------------------------------------------------------------------------------
# Signals


def test_logit_confidence_is_log_odds_and_stable():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0], [0.3, 0.1, -4.0]])
    y = torch.tensor([0, 2, 1])
    p = torch.softmax(logits.double(), -1)[torch.arange(3), y]
    torch.testing.assert_close(privacy.logit_confidence(logits, y), torch.log(p / (1 - p)))
    # far past where p_y rounds to 1 (and 1 - p_y to 0): z_y - logsumexp(others), exactly
    big = torch.tensor([[800.0, 0.0, 0.0], [-800.0, 0.0, 0.0]], dtype=torch.float32)
    got = privacy.logit_confidence(big, torch.tensor([0, 0]))
    expected = torch.tensor([800 - math.log(2), -800 - math.log(2)], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    # queries: (B, A, C) -> (B, A)
    stacked = torch.stack([logits, logits.flip(-1)], dim=1)
    got = privacy.logit_confidence(stacked, y)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got[:, 0], privacy.logit_confidence(logits, y))
    torch.testing.assert_close(got[:, 1], privacy.logit_confidence(logits.flip(-1), y))
    with pytest.raises(ValueError, match=r"logits must be a \(B, C\) or \(B, A, C\) tensor"):
        privacy.logit_confidence(torch.zeros(3), y)
    with pytest.raises(ValueError, match=r"y must be a \(3,\) integer tensor"):
        privacy.logit_confidence(logits, y.float())


def small_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def test_confidence_and_loss_signals_restore_the_model():
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Linear(16, 3)).double()
    model.train()
    x = torch.randn(37, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (37,))
    conf = privacy.confidence_signal(model, x, y, batch_size=10)
    loss = privacy.loss_signal(model, x, y, batch_size=10)
    assert model.training  # scored in eval mode (no dropout), left as found
    model.eval()
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(conf, privacy.logit_confidence(logits, y))
    expected = nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(loss, expected)
    # with cross entropy, loss = log(1 + exp(-confidence)): the two carry the same information
    torch.testing.assert_close(loss, torch.nn.functional.softplus(-conf))


def test_confidence_and_loss_signals_take_the_outputs_the_scorer_takes():
    # a tuple whose first element is the logits, a mapping with "logits", an object's .logits
    model = small_model()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    conf = privacy.confidence_signal(model, x, y, batch_size=4)
    loss = privacy.loss_signal(model, x, y, batch_size=4)

    class Output:
        def __init__(self, logits):
            self.logits = logits

    for wrap in (lambda t: (t, t.sum(1)), lambda t: {"logits": t, "aux": t}, Output):
        wrapped = lambda v, wrap=wrap: wrap(model(v))  # noqa: E731
        torch.testing.assert_close(privacy.confidence_signal(wrapped, x, y, batch_size=4), conf)
        torch.testing.assert_close(privacy.loss_signal(wrapped, x, y, batch_size=4), loss)


def test_curvature_signal_is_h_times_curvkerns_on_the_papers_scale():
    """The Curvature Clues score: |L(x+v+u) - L(x-v+u) - L(x+v-u) + L(x-v-u)| / (4h) with
    v = h r, u = h s, averaged over probe pairs; here r, s are curvkern's probes (streams 0, 1)."""
    model = small_model()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    ids = torch.arange(100, 108)
    h, n = 1e-3, 6
    raw = privacy.curvature_signal(model, x, y, ids, h=h, n_probes=n, seed=3, log=False)
    scores = CurvatureScorer(model, h=h, n_probes=n, seed=3, method="zo").score(x, y, ids)
    torch.testing.assert_close(raw, scores.curvature.double())
    r = ops.rademacher(3, ids, n, (5,), 0, 0, torch.float64)  # (n, B, 5)
    s = ops.rademacher(3, ids, n, (5,), 0, 1, torch.float64)

    def loss(z):
        with torch.no_grad():
            return nn.functional.cross_entropy(model(z), y, reduction="none")

    paper = torch.stack(
        [
            (
                loss(x + h * r[k] + h * s[k])
                - loss(x - h * r[k] + h * s[k])
                - loss(x + h * r[k] - h * s[k])
                + loss(x - h * r[k] - h * s[k])
            ).abs()
            / (4 * h)
            for k in range(n)
        ]
    ).mean(0)
    torch.testing.assert_close(h * raw, paper, rtol=1e-9, atol=0)
    logged = privacy.curvature_signal(model, x, y, ids, h=h, n_probes=n, seed=3)
    torch.testing.assert_close(logged, torch.log(paper + 1e-22), rtol=1e-9, atol=0)


def test_curvature_signal_warns_once_per_model_not_per_batch():
    # A float32 model with large logits: zo at h = 1e-3 flags samples in every batch of 10; the
    # signal of one model over its 40 samples gives one warning counted over all 40.
    model = small_model(dtype=torch.float32)
    with torch.no_grad():
        model[-1].weight.mul_(20)
    x = torch.randn(40, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        privacy.curvature_signal(model, x, y, batch_size=10, n_probes=2)
    messages = [str(w.message) for w in caught if "method='zo'" in str(w.message)]
    assert len(messages) == 1 and " of 40 samples" in messages[0]
    assert caught[0].filename == __file__


def test_shadow_signals_layout():
    models = [small_model(seed) for seed in range(3)]
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    two = shadow = privacy.shadow_signals(models, x, y, privacy.confidence_signal)
    assert shadow.shape == (3, 10)
    torch.testing.assert_close(shadow[1], privacy.confidence_signal(models[1], x, y))
    three = privacy.shadow_signals(models, [x, -x], y, privacy.loss_signal)
    assert three.shape == (3, 10, 2)
    torch.testing.assert_close(three[2, :, 1], privacy.loss_signal(models[2], -x, y))
    assert two.dtype == three.dtype == torch.float64
    with pytest.raises(ValueError, match="queries must be"):
        privacy.shadow_signals(models, [x, x[:5]], y, privacy.loss_signal)


# ----------------------------------------------------------------------------------------------
# Exports


def _lira_load_data(folder, listing_order):
    """LiRA's plot.py load_data, restated, with the file system's listing order as a parameter.

    ``os.walk`` lists a folder's subfolders in the order the file system returns them (on
    ext4, by a hash of the name); ``listing_order`` reorders each level's list in place, as
    such a file system would, and the walk then descends in that order too.
    """
    scores, keep = [], []
    for root, dirs, _ in os.walk(folder):
        listing_order(dirs)
        for d in dirs:
            if not d.startswith("experiment"):
                continue
            if not os.path.exists(os.path.join(root, d, "scores")):
                continue
            last = sorted(os.listdir(os.path.join(root, d, "scores")))[-1]
            scores.append(np.load(os.path.join(root, d, "scores", last)))
            keep.append(np.load(os.path.join(root, d, "keep.npy")))
    return np.array(scores), np.array(keep)


def _listing_orders():
    rngs = [np.random.default_rng(seed) for seed in range(6)]
    shuffles = [lambda dirs, rng=rng: rng.shuffle(dirs) for rng in rngs]
    return [lambda dirs: dirs.sort(), lambda dirs: dirs.sort(reverse=True), *shuffles]


def test_export_lira_is_read_back_by_liras_loader(tmp_path):
    rng = np.random.default_rng(5)
    scores, keep = rng.normal(size=(4, 7, 2)), rng.random((4, 7)) < 0.5
    paths = privacy.export_lira(tmp_path, scores, keep)
    assert len(paths) == 4
    loaded_scores, loaded_keep = _lira_load_data(tmp_path, lambda dirs: dirs.sort())
    order = np.argsort([int(os.path.basename(p).split("-")[1].split("_")[0]) for p in paths])
    np.testing.assert_array_equal(loaded_scores, scores[order])
    np.testing.assert_array_equal(loaded_keep, keep[order])
    assert loaded_keep.dtype == bool
    privacy.export_lira(tmp_path / "flat", scores[..., 0], keep)  # (M, N) -> A = 1
    first = np.load(tmp_path / "flat" / "experiment-0_4" / "scores" / "0000000000.npy")
    assert first.shape == (7, 1)


@pytest.mark.parametrize("queries", [None, 2])
def test_export_lira_target_is_read_last_whatever_the_listing_order(tmp_path, queries):
    # plot.py attacks the last model its walk read; with 20 sibling folders the file system
    # decides which one that is, so the target must be read last in every listing order.
    rng = np.random.default_rng(7)
    shape = (20, 9) if queries is None else (20, 9, queries)
    scores, keep = rng.normal(size=shape), rng.random((20, 9)) < 0.5
    target, target_keep = rng.normal(size=shape[1:]) + 100.0, rng.random(9) < 0.5
    paths = privacy.export_lira(tmp_path, scores, keep, target, target_keep)
    assert len(paths) == 21
    want = scores.reshape(20, 9, -1)
    for listing_order in _listing_orders():
        loaded_scores, loaded_keep = _lira_load_data(tmp_path, listing_order)
        assert loaded_scores.shape == (21, 9, want.shape[2])
        np.testing.assert_array_equal(loaded_scores[-1], target.reshape(9, -1))
        np.testing.assert_array_equal(loaded_keep[-1], target_keep)
        # the shadows are all the others, each once, with its own membership
        shadow_rows = sorted(tuple(r.ravel()) for r in loaded_scores[:-1])
        assert shadow_rows == sorted(tuple(r.ravel()) for r in want)
        for row, kept in zip(loaded_scores[:-1], loaded_keep[:-1], strict=True):
            m = next(i for i in range(20) if np.array_equal(want[i], row))
            np.testing.assert_array_equal(kept, keep[m])


def test_export_lira_several_targets_and_errors(tmp_path):
    rng = np.random.default_rng(8)
    scores, keep = rng.normal(size=(6, 5)), rng.random((6, 5)) < 0.5
    targets, targets_keep = rng.normal(size=(2, 5)) + 100.0, rng.random((2, 5)) < 0.5
    privacy.export_lira(tmp_path / "two", scores, keep, targets, targets_keep)
    for listing_order in _listing_orders():
        loaded_scores, loaded_keep = _lira_load_data(tmp_path / "two", listing_order)
        assert sorted(loaded_scores[-2:, :, 0].tolist()) == sorted(targets.tolist())
        assert (loaded_scores[:-2] < 50).all()  # every shadow read before both targets
    with pytest.raises(ValueError, match="already holds"):
        privacy.export_lira(tmp_path / "two", scores, keep)  # stale folders would be read too
    with pytest.raises(ValueError, match="give both or neither"):
        privacy.export_lira(tmp_path / "a", scores, keep, targets[0])
    with pytest.raises(ValueError, match=r"target_scores and target_keep must be \(5,\)"):
        privacy.export_lira(tmp_path / "b", scores, keep, targets[0, :4], targets_keep[0])
    with pytest.raises(ValueError, match="target_keep must be boolean or 0/1"):
        privacy.export_lira(tmp_path / "c", scores, keep, targets[0], np.full(5, 2))
    with pytest.raises(ValueError, match="target_scores has 1 NaN"):
        privacy.export_lira(
            tmp_path / "d", scores, keep, np.r_[np.nan, targets[0, 1:]], targets_keep[0]
        )
    assert not (tmp_path / "a").exists()  # nothing written before the checks pass


def test_privacy_meter_arrays():
    rng = np.random.default_rng(6)
    scores, keep = rng.normal(size=(4, 7)), rng.random((4, 7)) < 0.5
    signals, members = privacy.privacy_meter_arrays(scores, keep)
    np.testing.assert_array_equal(signals, scores.T)  # (num_samples, num_models)
    np.testing.assert_array_equal(members, keep.T)
    target, target_keep = torch.randn(7, dtype=torch.float64), torch.rand(7) < 0.5
    signals, members = privacy.privacy_meter_arrays(scores, keep, target, target_keep)
    assert signals.shape == members.shape == (7, 5)
    np.testing.assert_array_equal(signals[:, 4], target.numpy())  # the target: last column
    np.testing.assert_array_equal(members[:, 4], target_keep.numpy())
    with pytest.raises(ValueError, match="one value per"):
        privacy.privacy_meter_arrays(scores[..., None], keep)
    with pytest.raises(ValueError, match="give both or neither"):
        privacy.privacy_meter_arrays(scores, keep, target)
