"""Sparsity schemes and losses against hand-written references and analytic expectations."""

import math
import threading

import pytest
import torch
import torch.distributed as dist

from crosscoders import activations as A
from crosscoders.config import CrosscoderConfig
from crosscoders.losses import (
    auxk_loss,
    batch_topk,
    crosscoder_loss,
    l1_penalty,
    tanh_joint_penalty,
    tanh_penalty,
    tanh_quad_penalty,
)
from crosscoders.mesh import Mesh
from crosscoders.model import Crosscoder


def model(activation, S=2, D=6, H=10, seed=0):
    return Crosscoder(CrosscoderConfig(n_sources=S, d_in=D, d_sae=H, activation=activation, seed=seed, k=2.0))


def test_relu_loss_is_mse_summed_over_sources_plus_decoder_weighted_l1():
    m = model("relu").train()
    x = torch.randn(12, 2, 6, generator=torch.Generator().manual_seed(0))
    out = crosscoder_loss(m, x, sparsity_coef=0.7, sparsity="l1")
    f = torch.relu(torch.einsum("bsd,sdh->bh", x, m.W_enc) + m.b_enc)
    x_hat = torch.einsum("bh,shd->bsd", f, m.W_dec) + m.b_dec
    mse = ((x - x_hat) ** 2).sum((1, 2)).mean()
    l1 = (f * (m.W_dec[0].norm(dim=1) + m.W_dec[1].norm(dim=1))).sum(1).mean()  # Lindsey et al. 2024
    torch.testing.assert_close(out.mse, mse)
    torch.testing.assert_close(out.sparsity, l1)
    torch.testing.assert_close(out.total, mse + 0.7 * l1)
    torch.testing.assert_close(out.mse_per_source.sum(), mse)


def test_relu_default_penalty_is_l1_times_the_l2_norm_over_sources():
    m = model("relu").train()
    x = torch.randn(12, 2, 6, generator=torch.Generator().manual_seed(0))
    out = crosscoder_loss(m, x, sparsity_coef=0.7)  # "auto" = l1_l2 for relu
    f = torch.relu(torch.einsum("bsd,sdh->bh", x, m.W_enc) + m.b_enc)
    n = torch.sqrt(m.W_dec[0].norm(dim=1) ** 2 + m.W_dec[1].norm(dim=1) ** 2)  # |W_dec[:, i]| concatenated
    torch.testing.assert_close(out.sparsity, (f * n).sum(1).mean())


def test_tanh_penalty_counts_strong_latents_and_ignores_zeros():
    f = torch.tensor([[0.0, 10.0, 0.0], [5.0, 0.0, 0.0]])
    norm = torch.tensor([1.0, 1.0, 3.0])
    torch.testing.assert_close(tanh_penalty(f, norm, 4.0), torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(l1_penalty(f, norm), torch.tensor(7.5))


def test_jumprelu_threshold_pseudo_gradient_estimates_the_density():
    # d/dtheta E[H(z - theta)] = -p(theta); for z ~ U(0, 1) that is -1 (Rajamanoharan et al. 2024, KDE).
    z = torch.rand(200_000, 1, generator=torch.Generator().manual_seed(0))
    theta = torch.tensor([0.4], requires_grad=True)
    gate = A._Step.apply(z, theta, 0.1, False)
    gate.mean().backward()
    assert abs(theta.grad.item() + 1.0) < 0.03
    # forward: f = pre where pre * N > theta
    pre = torch.tensor([[0.5, 0.5, -1.0]])
    out = A.jumprelu(pre, torch.tensor([1.0, 4.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), 0.1)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.0]]))


def test_jumprelu_gate_sees_no_input_gradient_by_default():
    pre = torch.tensor([[0.3, 2.0]], requires_grad=True)
    out = A.jumprelu(pre, torch.ones(2), torch.tensor([0.35, 1.0]), 0.2)
    out.sum().backward()
    torch.testing.assert_close(pre.grad, torch.tensor([[0.0, 1.0]]))  # closed gate: no gradient


def test_batch_topk_keeps_the_largest_decoder_scaled_activations():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(8, 5, generator=g)
    norm = torch.rand(5, generator=g) + 0.1
    f, min_kept = A.batch_topk(pre, norm, k=1.5)
    scores = (pre.relu() * norm).flatten()
    keep = scores.argsort(descending=True)[:12]  # 1.5 * 8
    mask = torch.zeros(40, dtype=torch.bool)
    mask[keep] = True
    torch.testing.assert_close(f, pre.relu() * mask.view(8, 5))
    torch.testing.assert_close(min_kept, scores[keep].min())


def test_threshold_gate_equals_jumprelu_forward():
    pre = torch.randn(30, 7)
    norm, theta = torch.rand(7) + 0.5, torch.rand(7)
    torch.testing.assert_close(A.threshold_gate(pre, norm, theta), A.jumprelu(pre, norm, theta, 0.1))


def test_auxk_trains_only_dead_latents_on_the_residual():
    m = model("batchtopk", H=12).train()
    x = torch.randn(16, 2, 6)
    dead = torch.zeros(12, dtype=torch.bool)
    x_hat = m.decode(m.encode(x)).detach()
    pre = m.pre_acts(x)
    norm = m.decoder_norms().sum(-1)
    assert auxk_loss(m, x, x_hat, pre, norm, dead, 3).item() == 0.0
    dead[[1, 4, 7]] = True
    loss = auxk_loss(m, x, x_hat, pre, norm, dead, 3)
    assert loss.item() > 0
    loss.backward()
    alive_grad = m.W_enc.grad[:, :, ~dead].abs().max()
    assert alive_grad == 0 and m.W_enc.grad[:, :, dead].abs().max() > 0
    # reference (Gao et al. 2024): per token, the top-2 dead latents reconstruct the residual, no bias;
    # 3 dead latents with k_aux = 2 -> no down-scaling
    with torch.no_grad():
        ref = auxk_loss(m, x, x_hat, pre, norm, dead, 2)
        a = pre.relu().clone()
        a[:, ~dead] = 0
        scores = a * norm
        cut = scores.topk(2, dim=-1).values[:, -1:]
        a = torch.where((scores >= cut) & (scores > 0), a, 0)
        recon = torch.einsum("bh,shd->bsd", a, m.W_dec)
        expect = ((recon - (x - x_hat)) ** 2).sum((1, 2)).mean()
    torch.testing.assert_close(ref, expect)


def test_loss_terms_per_scheme():
    x = torch.randn(32, 2, 6)
    dead = torch.ones(10, dtype=torch.bool)
    b = crosscoder_loss(model("batchtopk").train(), x, 1.0, dead)
    assert b.sparsity.item() == 0 and b.aux.item() > 0 and b.min_kept is not None
    assert int((b.f > 0).sum()) == 64  # k = 2 per token on average
    j = crosscoder_loss(model("jumprelu").train(), x, 1.0, dead, pre_act_coef=1.0)
    assert j.sparsity.item() >= 0 and j.aux.item() > 0


def test_tanh_quad_penalty_matches_the_direct_formula():
    # Ge et al. 2025 (OpenMOSS "tanh-quad"): lambda * sum_i p_i (1 + p_i / s), p_i = mean over batch and
    # sources of tanh(c f[b, s, i] |W_dec[s, i]|), written out with loops as the reference.
    g = torch.Generator().manual_seed(3)
    f = torch.relu(torch.randn(5, 3, 4, generator=g))
    norm = torch.rand(3, 4, generator=g) + 0.1
    c, s = 4.0, 0.01
    ref = 0.0
    for i in range(4):
        p = sum(math.tanh(c * f[b, j, i].item() * norm[j, i].item()) for b in range(5) for j in range(3)) / 15
        ref += p * (1 + p / s)
    torch.testing.assert_close(tanh_quad_penalty(f, norm, c, s), torch.tensor(ref), rtol=1e-5, atol=0)
    # through crosscoder_loss: a per-source jumprelu model with sparsity="tanh_quad"
    m = Crosscoder(CrosscoderConfig(n_sources=2, d_in=6, d_sae=10, activation="jumprelu", gate="per_source",
                                    jumprelu_init_threshold=0.0, tanh_scale=c)).train()
    x = torch.randn(12, 2, 6, generator=g)
    out = crosscoder_loss(m, x, sparsity_coef=0.3, sparsity="tanh_quad", frequency_scale=s)
    n = m.W_dec.norm(dim=-1)  # [n_sources, d_sae]
    p = torch.tanh(c * out.f * n).mean((0, 1))
    torch.testing.assert_close(out.sparsity, (p * (1 + p / s)).sum())
    torch.testing.assert_close(out.total, out.mse + 0.3 * out.sparsity)


def test_tanh_penalty_per_source_is_the_mean_over_sources():
    f = torch.tensor([[[0.0, 10.0], [0.0, 0.0]]])  # [batch 1, sources 2, d_sae 2]: latent 1 open in source 0
    norm = torch.ones(2, 2)
    torch.testing.assert_close(tanh_penalty(f, norm, 4.0), torch.tensor(0.5), atol=1e-6, rtol=0)


def test_tanh_joint_penalty_charges_a_latent_once_so_splitting_over_sources_costs():
    # one latent open in both sources pays ~1 (tanh of its summed output); the same feature split into two
    # latents, each open in one source, pays ~2; tanh's per-source mean charges both 1 (why features split)
    norm = torch.ones(2, 2)
    one = torch.tensor([[[10.0, 0.0], [10.0, 0.0]]])  # [batch 1, sources 2, d_sae 2]
    split = torch.tensor([[[10.0, 0.0], [0.0, 10.0]]])
    torch.testing.assert_close(tanh_joint_penalty(one, norm, 4.0), torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(tanh_joint_penalty(split, norm, 4.0), torch.tensor(2.0), atol=1e-6, rtol=0)
    assert tanh_penalty(one, norm, 4.0).item() == tanh_penalty(split, norm, 4.0).item()
    # a shared code: the same as tanh
    f = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    n = torch.tensor([0.5, 1.0, 2.0])
    torch.testing.assert_close(tanh_joint_penalty(f, n, 4.0), tanh_penalty(f, n, 4.0))


def test_jumprelu_default_penalty_is_tanh_of_the_output_summed_over_sources():
    # per-source jumprelu with sparsity "auto": sum_i tanh(c sum_s f[s, i] |W_dec[s, i]|), written out by hand
    c = 1.5
    m = Crosscoder(CrosscoderConfig(n_sources=3, d_in=4, d_sae=6, activation="jumprelu", gate="per_source",
                                    jumprelu_init_threshold=0.0, tanh_scale=c)).train()
    x = torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1))
    out = crosscoder_loss(m, x, sparsity_coef=0.3)
    pre = torch.einsum("bsd,sdh->bh", x, m.W_enc) + m.b_enc
    ref = 0.0
    for b in range(5):
        for i in range(6):
            z = sum(max(pre[b, i].item(), 0.0) * m.W_dec[s, i].norm().item() for s in range(3))
            ref += math.tanh(c * z) / 5
    torch.testing.assert_close(out.sparsity, torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_nested_topk_term_reconstructs_from_the_strongest_entries_of_the_batch():
    # batchtopk with nested_k_frac 0.5: the extra term is the squared error of the reconstruction from the
    # k/2 * batch largest relu(pre) N of the batch alone (N = sum_s |W_dec[s, i]|), coefficient applied
    m = model("batchtopk", H=12).train()
    x = torch.randn(16, 2, 6, generator=torch.Generator().manual_seed(3))
    out = crosscoder_loss(m, x, 1.0, nested_k_frac=0.5, nested_k_coef=0.7, sparse=False)
    with torch.no_grad():
        pre = torch.einsum("bsd,sdh->bh", x, m.W_enc) + m.b_enc
        norm = m.W_dec.norm(dim=-1).sum(0)
        scores = (pre.relu() * norm).flatten()
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[scores.sort(descending=True).indices[:16]] = True  # k = 2 -> 1 per token -> 16 entries
        f = torch.where(keep.view_as(pre), pre.relu(), 0)
        x_hat = torch.einsum("bh,shd->bsd", f, m.W_dec) + m.b_dec
        expect = 0.7 * ((x - x_hat) ** 2).sum((1, 2)).mean()
    torch.testing.assert_close(out.nested, expect)
    torch.testing.assert_close(out.total, out.mse + out.nested)  # no dead latents given: no AuxK
    assert crosscoder_loss(m, x, 1.0).nested is None  # the loss function's default: off


class ThreadMesh(Mesh):
    """Rank `rank` of D data ranks run as threads of this process: the collectives `losses.batch_topk` uses,
    over shared slots, so the multi-rank rules are checked without torch.distributed."""

    def __init__(self, rank: int, shared: dict):
        D = shared["barrier"].parties
        super().__init__(rank, D, D, 1, rank, 0)
        self.shared = shared

    def _all(self, t):
        s = self.shared
        s["slots"][self.rank] = t.clone()
        s["barrier"].wait()
        out = list(s["slots"])
        s["barrier"].wait()
        return out

    def gather_data(self, t):
        return torch.cat(self._all(t))

    def reduce_(self, t, group, op=None):
        parts = torch.stack(self._all(t))
        return t.copy_(parts.amin(0) if op == dist.ReduceOp.MIN else
                       parts.amax(0) if op == dist.ReduceOp.MAX else parts.sum(0))


def on_data_ranks(D, fn, *args):
    """`fn(mesh, rank, *args)` on D threaded ranks; their results in rank order."""
    shared = {"barrier": threading.Barrier(D), "slots": [None] * D}
    out = [None] * D

    def run(r):
        out[r] = fn(ThreadMesh(r, shared), r, *args)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(D)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def tied_scores(B=16, H=12):
    """Pre-activations on a coarse grid, whole rows repeated: many ties, also at the cut (as when the store's
    reader puts one token twice into a batch)."""
    g = torch.Generator().manual_seed(4)
    pre = torch.randint(-2, 4, (B // 2, H), generator=g).float() / 2
    return torch.cat([pre, pre]), torch.ones(H)


def test_batch_topk_keeps_exactly_k_ties_to_the_lowest_index():
    pre, norm = tied_scores()
    f, min_kept = A.batch_topk(pre, norm, k=1.5)
    n_keep = 24  # 1.5 x 16
    scores = pre.relu().flatten()
    order = sorted(range(scores.numel()), key=lambda i: (-scores[i].item(), i))  # by score, then index
    expect = torch.zeros(scores.numel(), dtype=torch.bool)
    expect[order[:n_keep]] = True
    assert (scores[expect] == scores[order[n_keep - 1]]).sum() < (scores == scores[order[n_keep - 1]]).sum()  # a tie is cut
    assert torch.equal(f.flatten() != 0, expect & (scores > 0))
    assert min_kept.item() == scores[expect].min().item()


def test_first_true_sync_free_path_equals_the_cpu_path():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1000, generator=g) < 0.3
    for n in (-3, 0, 1, 57, int(mask.sum()), 5000):
        a = A.first_true(mask, torch.tensor(n), sync_free=True)
        b = A.first_true(mask, torch.tensor(n), sync_free=False)
        assert torch.equal(a, b) and int(a.sum()) == min(max(n, 0), int(mask.sum()))


@pytest.mark.parametrize("D", [2, 4])
def test_batch_topk_on_data_ranks_is_the_one_process_code_exactly(D):
    pre, norm = tied_scores()
    f_one, min_one = A.batch_topk(pre, norm, k=1.5)
    rows = pre.shape[0] // D
    parts = on_data_ranks(D, lambda mesh, r: batch_topk(pre[r * rows:(r + 1) * rows], norm, 1.5, mesh))
    f = torch.cat([p[0] for p in parts])
    assert int((f != 0).sum()) <= 24 and torch.equal(f, f_one)  # every tied entry at the cut kept: more than 24
    assert all(p[1].item() == min_one.item() for p in parts)
