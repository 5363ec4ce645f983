"""Rejection sampling keeps the target distribution (issue 21): on a 16-token vocabulary, the tokens that
speculative steps give (drafts accepted, or drawn from the residual) are distributed as plain sampling's,
by a chi-square test against the exact distribution; the same test refuses two wrong implementations."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import v4c
import v4c.runtime.speculative as spec
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.runtime.sampling import distribution

V, ROWS, PROMPT = 16, 1000, [3, 1, 4, 1, 5]
ALPHA = 1e-3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # sliding layers only: the test is about the acceptance rule, and a thousand rows stay quick
    cfg = tiny_config_dict(vocab_size=V, num_hidden_layers=2, layer_types=["sliding_attention"] * 2,
                           mlp_layer_types=["hash_moe", "moe"])
    ck = write_random_checkpoint(cfg, tmp_path_factory.mktemp("v16") / "ck", seed=3, mtp=True)
    t = load_file(ck / "model.safetensors")
    # a sharper draft distribution than the random block's own: far from the target, so that a wrong residual
    # shows at this sample size (the target is still all that the tokens may follow)
    t["mtp.0.norm.weight"] = t["mtp.0.norm.weight"] * 4
    save_file(t, ck / "model.safetensors")
    return v4c.load(v4c.compile(ck, ck.parent / "art", target="cpu"))


@torch.inference_mode()
def exact_marginals(model, temperature, top_p):
    """P(token 2) and P(token 3) of plain sampling: sums over every first (and second) token."""
    t1 = torch.arange(V)
    ctx1 = torch.cat([torch.tensor(PROMPT).expand(V, -1), t1[:, None]], 1)
    p0 = _dist(model.new_session(1).forward(torch.tensor([PROMPT]))[0, -1], temperature, top_p)
    p1 = _dist(model.new_session(V).forward(ctx1)[:, -1], temperature, top_p)  # [t1, t2]
    ctx2 = torch.cat([ctx1.repeat_interleave(V, 0), t1.repeat(V)[:, None]], 1)  # rows (t1, t2)
    p2 = _dist(model.new_session(V * V).forward(ctx2)[:, -1], temperature, top_p).reshape(V, V, V)
    m2 = p0 @ p1
    m3 = torch.einsum("a,ab,abc->c", p0, p1, p2)
    return m2, m3


def _dist(logits, temperature, top_p):
    p = distribution(logits.double(), temperature, top_p)
    return p / p.sum(-1, keepdim=True)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; cells expecting fewer than 5 are pooled into one."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = torch.cat([counts[~small].double(), counts[small].sum()[None].double()])
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def sampled_tokens(model, temperature, top_p, seed):
    ids = torch.tensor([PROMPT]).expand(ROWS, -1)
    out = model.generate(ids, 3, temperature=temperature, top_p=top_p, seed=seed, speculative="mtp", draft_tokens=2)
    return out.tokens[:, len(PROMPT):], out.stats


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_speculative_samples_follow_plain_sampling(model, temperature, top_p):
    m2, m3 = exact_marginals(model, temperature, top_p)
    new, stats = sampled_tokens(model, temperature, top_p, seed=1)  # (12 seeds pooled at 1.0: p = 0.14)
    # the draft block's distribution is far from the main model's: the residual does real work
    assert 0 < stats.histogram[0] and 0 < stats.histogram[1] + stats.histogram[2]
    for col, m in ((1, m2), (2, m3)):
        counts = torch.bincount(new[:, col], minlength=V)
        assert chi2_pvalue(counts, m) > ALPHA, (col, counts.tolist(), (m * ROWS).round().tolist())


def test_the_test_refuses_wrong_rejection_sampling(model, monkeypatch):
    """Two plausible mistakes, each caught at this sample size: keeping every draft, and drawing the token
    after a refused draft from p instead of the residual max(0, p - q)."""
    m2, _ = exact_marginals(model, 1.0, 1.0)

    def probs(logits):
        return _dist(logits, 1.0, 1.0).float()

    def keep_all(logits, drafts, q, temperature, top_p, gen):
        k = drafts.shape[1]
        return torch.full((drafts.shape[0],), k), torch.multinomial(probs(logits[:, k]), 1, generator=gen)[:, 0]

    def residual_from_p(logits, drafts, q, temperature, top_p, gen):
        b, k = drafts.shape
        p = probs(logits)
        ratio = p[:, :k].gather(-1, drafts[..., None])[..., 0] / q.gather(-1, drafts[..., None])[..., 0]
        a = (torch.rand(b, k, generator=gen) < ratio).long().cumprod(1).sum(1)
        return a, torch.multinomial(p[torch.arange(b), a], 1, generator=gen)[:, 0]  # p, not max(0, p - q)

    for wrong in (keep_all, residual_from_p):
        monkeypatch.setattr(spec, "accept", wrong)
        new, _ = sampled_tokens(model, 1.0, 1.0, seed=0)
        assert chi2_pvalue(torch.bincount(new[:, 1], minlength=V), m2) < ALPHA, wrong.__name__
