"""`PrototypeClassifier` through its public call against a plain float64 reference written here,
step by step as the released ProtoSeg code (HRNet_W48_Proto without its backbone and
classification convolution; distributed_sinkhorn; PPC and PPD of loss_proto.py): a Python loop
over classes, one Sinkhorn per class, one momentum update per class, the prototypes a
``nn.Parameter`` replaced by a new frozen one every step (the optimiser keeps the first).

Over four steps with an SGD optimiser on both sides: logits, PPC, PPD, the prototype logits and
targets, the gradients of the features and of every parameter (each output on its own), the
prototypes after each step, the parameters after each optimiser step and the generator state,
for both assignments; with ignored labels (255, -1 and a label >= K), an absent class, a class
with one pixel and a step where every pixel is ignored (the release divides 0 by 0 there; the
module returns zero losses that are still part of the graph).

The one difference from the release: the Gumbel noise comes from the module's own generator,
drawn once per step for all pixels (one row each, pixels grouped by class in increasing class
order, then by pixel index; the rows of pixels without a class come last and are unused)
instead of from the global generator class after class. The reference takes the same rows.
``test_released_gumbel_softmax_draws_the_same_one_hot`` shows that on the CPU the released
``F.gumbel_softmax`` calls, fed by a global generator with the same seed, pick the same
prototypes.

Argmax choices (the prediction, the maximum over a class's prototypes, the Sinkhorn argmax,
the Gumbel argmax) are compared exactly, so the data must have no near-tie: ``_check_margins``
asserts that every one of them wins by more than ``MARGIN``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastseg import PrototypeClassifier
from contrastseg.prototype import TARGET_IGNORE, segment_sinkhorn

K, CIN, M, D = 4, 6, 3, 5  # classes, feature channels, prototypes per class, embedding size
B, GRID = 2, (5, 7)  # the features' grid; labels are twice as large
MOMENTUM, ITERS, EPS, TAU = 0.999, 3, 0.05, 0.5
SEED = 7
STEPS = 4  # the last one has every pixel ignored
REL = 1e-10
MARGIN = 1e-8

# The module's names -> the released model's (proj_head.mlp2.* is a second name of the same
# convolutions in the release's state_dict).
RELEASED_NAMES = {
    "projection.0.weight": "proj_head.proj.0.weight",
    "projection.0.bias": "proj_head.proj.0.bias",
    "projection.2.weight": "proj_head.proj.2.weight",
    "projection.2.bias": "proj_head.proj.2.bias",
    "feat_norm.weight": "feat_norm.weight",
    "feat_norm.bias": "feat_norm.bias",
    "mask_norm.weight": "mask_norm.weight",
    "mask_norm.bias": "mask_norm.bias",
    "prototypes": "prototypes",
}
PARAMS = [name for name in RELEASED_NAMES if name != "prototypes"]


# ------------------------------------------------------------------------------ reference
def l2(x):
    return F.normalize(x, p=2, dim=-1)


class ReleasedHead(nn.Module):
    """Conv1x1 -> ReLU -> Conv1x1, then ``F.normalize(dim=-1)``: over the last axis of
    ``(B, D, h, w)``, the width, as the released head does."""

    def __init__(self, dim_in, proj_dim):
        super().__init__()
        self.proj = self.mlp2 = nn.Sequential(
            nn.Conv2d(dim_in, dim_in, 1), nn.ReLU(inplace=True), nn.Conv2d(dim_in, proj_dim, 1)
        )

    def forward(self, x):
        return l2(self.proj(x))


def released_sinkhorn(out, gumbels, assignment, iterations=ITERS, epsilon=EPS):
    """distributed_sinkhorn, step by step; its ``F.gumbel_softmax(L, tau, hard=True)`` with the
    Gumbel noise given (``assignment="argmax"``: the one-hot of the argmax instead, the line the
    release left commented out). Returns the one-hot q, the argmax and the plan L."""
    L = torch.exp(out / epsilon).t()  # M x n
    n = L.shape[1]
    m = L.shape[0]
    L /= torch.sum(L)
    for _ in range(iterations):
        L /= torch.sum(L, dim=1, keepdim=True)
        L /= m
        L /= torch.sum(L, dim=0, keepdim=True)
        L /= n
    L *= n
    L = L.t()
    indexs = torch.argmax(L, dim=1)
    if assignment == "argmax":
        return F.one_hot(indexs, num_classes=L.shape[1]).to(L.dtype), indexs, L
    y_soft = ((L + gumbels) / TAU).softmax(-1)
    index = y_soft.max(-1, keepdim=True)[1]
    y_hard = torch.zeros_like(L).scatter_(-1, index, 1.0)
    return y_hard - y_soft.detach() + y_soft, indexs, L


class ReleasedProto(nn.Module):
    """HRNet_W48_Proto from its projection head on, with the released PPC and PPD."""

    def __init__(self, assignment):
        super().__init__()
        self.assignment = assignment
        self.prototypes = nn.Parameter(torch.zeros(K, M, D), requires_grad=True)
        self.proj_head = ReleasedHead(CIN, D)
        self.feat_norm = nn.LayerNorm(D)
        self.mask_norm = nn.LayerNorm(K)
        self.checks = {}  # what _check_margins reads

    def prototype_learning(self, _c, out_seg, gt_seg, masks, noise):
        pred_seg = torch.max(out_seg, 1)[1]
        mask = gt_seg == pred_seg.view(-1)
        proto_logits = torch.mm(_c, self.prototypes.view(-1, self.prototypes.shape[-1]).t())
        proto_target = gt_seg.clone().float()
        protos = self.prototypes.data.clone()
        row = 0  # the noise rows of the classes so far
        plans, gumbel_scores, picks = [], [], []
        for k in range(K):
            init_q = masks[..., k]
            init_q = init_q[gt_seg == k, ...]
            if init_q.shape[0] == 0:
                continue
            gumbels = None if noise is None else noise[row : row + init_q.shape[0]]
            row += init_q.shape[0]
            q, indexs, L = released_sinkhorn(init_q, gumbels, self.assignment)
            plans.append(L.detach())
            if gumbels is not None:
                gumbel_scores.append((L + gumbels).detach())
            picks.append(q.detach().argmax(1))
            m_k = mask[gt_seg == k]
            c_k = _c[gt_seg == k, ...]
            m_q = q * m_k[:, None].expand(-1, M)
            c_q = c_k * m_k[:, None].expand(-1, c_k.shape[-1])
            f = m_q.transpose(0, 1) @ c_q
            n = torch.sum(m_q, dim=0)
            if torch.sum(n) > 0:
                f = l2(f)
                protos[k, n != 0, :] = (
                    MOMENTUM * protos[k, n != 0, :] + (1 - MOMENTUM) * f[n != 0, :]
                )
            proto_target[gt_seg == k] = indexs.float() + (M * k)
        self.prototypes = nn.Parameter(l2(protos), requires_grad=False)
        self.checks.update(plans=plans, gumbel=gumbel_scores, picks=picks, correct=mask)
        return proto_logits, proto_target

    def forward(self, x, labels, noise):
        c = self.proj_head(x)
        _c = c.permute(0, 2, 3, 1).reshape(-1, c.shape[1])  # (b h w) c
        _c = self.feat_norm(_c)
        _c = l2(_c)
        self.prototypes.data.copy_(l2(self.prototypes))
        masks = torch.einsum("nd,kmd->nmk", _c, self.prototypes)
        out_seg = torch.amax(masks, dim=1)
        out_seg = self.mask_norm(out_seg)
        out_seg = out_seg.reshape(x.shape[0], x.shape[2], x.shape[3], K).permute(0, 3, 1, 2)
        gt = F.interpolate(labels[:, None].float(), size=x.shape[2:], mode="nearest").view(-1)
        # The release's ignore label is -1: every label outside [0, K) becomes it.
        gt_seg = torch.where((gt >= 0) & (gt < K), gt, -1.0)
        self.checks.update(masks=masks.detach(), out_seg=out_seg.detach(), gt=gt_seg)
        proto_logits, target = self.prototype_learning(_c, out_seg, gt_seg, masks, noise)
        ppc = F.cross_entropy(proto_logits, target.long(), ignore_index=-1)
        kept = proto_logits[target != -1, :]
        kept_target = target[target != -1]
        ppd = (1 - torch.gather(kept, 1, kept_target[:, None].long())).pow(2).mean()
        return out_seg, proto_logits, target, ppc, ppd


def draw_noise(gen, n_pixels):
    """The step's Gumbel noise: one row per pixel, as F.gumbel_softmax draws it."""
    return -torch.empty(n_pixels, M, dtype=torch.float64).exponential_(generator=gen).log()


# ----------------------------------------------------------------------------------- data
def batch(step: int, rank: int = 0):
    """Features and labels (twice the grid's size). Step 0: every class, class 3 on one pixel,
    labels 255, -1 and 7 ignored; step 1: class 1 absent; step 2: every class; step 3: every
    pixel ignored."""
    g = torch.Generator().manual_seed(100 * rank + step)
    x = torch.randn(B, CIN, *GRID, generator=g, dtype=torch.float64)
    grid = torch.randint(0, K - 1, (B, *GRID), generator=g)
    if step == 0:
        grid[0, 0, 0], grid[0, 0, 1], grid[0, 0, 2] = 255, -1, 7
        grid[1, :, 0] = 255
        grid[1, 2, 3] = 3  # the single pixel of class 3
    elif step == 1:
        grid[grid == 1] = 3
        grid[0, 4, :] = 255
    elif step == 2:
        grid[:, 0, :] = 3
        grid[1, 1, :3] = 255
    else:
        grid[:] = 255
    labels = grid.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return x, labels


def build(assignment: str, seed: int = SEED, noise_seed: int | None = None):
    """The reference and the module with the same weights (the module's loaded from the
    reference's state_dict through RELEASED_NAMES), LayerNorms not at their identity init; the
    module's generator seeded with ``noise_seed`` (default: ``seed``)."""
    torch.manual_seed(seed)
    ref = ReleasedProto(assignment).double()
    with torch.no_grad():
        nn.init.trunc_normal_(ref.prototypes, std=0.02)
        for norm in (ref.feat_norm, ref.mask_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    module = PrototypeClassifier(
        K,
        CIN,
        M,
        dim=D,
        momentum=MOMENTUM,
        sinkhorn_iterations=ITERS,
        sinkhorn_epsilon=EPS,
        assignment=assignment,
        gumbel_tau=TAU,
        seed=seed if noise_seed is None else noise_seed,
    ).double()
    released = ref.state_dict()
    assert {k for k in released if k.startswith("proj_head.mlp2.")}  # the release's 2nd name
    state = {ours: released[theirs] for ours, theirs in RELEASED_NAMES.items()}
    state["_extra_state"] = torch.empty(0, dtype=torch.uint8)  # no draw yet: from the seed
    module.load_state_dict(state)
    return ref, module


def close(actual, expected, what, rel=REL):
    expected = expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(expected.abs().max().item(), 1e-30) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert err <= rel, f"{what}: max error {err:.2e} of the largest entry (allowed {rel:.0e})"


def gap(scores):
    """The gap between the best and the second best of each row."""
    top = scores.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item() if top.numel() else float("inf")


def _check_margins(checks, assignment, what):
    """Every argmax the comparison relies on wins by more than MARGIN (else change the data)."""
    masks = checks["masks"]  # (N, M, K)
    assert gap(masks.transpose(1, 2)) > MARGIN, f"{what}: a class's best prototypes near-tie"
    labelled = checks["gt"] >= 0
    scores = checks["out_seg"].permute(0, 2, 3, 1).reshape(-1, K)
    assert gap(scores) > MARGIN, f"{what}: the prediction near-ties"
    for plan in checks["plans"]:
        if plan.shape[0] == 1:
            # One pixel: the plan is uniform, exactly (each prototype's only entry divided by
            # itself); the argmax takes the first prototype, here as in the release.
            assert bool((plan == plan[0, 0]).all()), f"{what}: a one-pixel plan is not uniform"
            continue
        assert gap(plan) > MARGIN, f"{what}: the Sinkhorn plan's argmax near-ties"
    if assignment == "gumbel":
        for scores in checks["gumbel"]:
            assert gap(scores) > MARGIN, f"{what}: the Gumbel argmax near-ties"
    return int(labelled.sum())


def grads(outputs, inputs):
    """The gradient of each output on its own (None -> zeros)."""
    result = []
    for out in outputs:
        got = torch.autograd.grad(out, inputs, retain_graph=True, allow_unused=True)
        result.append(
            [torch.zeros_like(i) if g is None else g for g, i in zip(got, inputs, strict=True)]
        )
    return result


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("assignment", ["gumbel", "argmax"])
def test_module_matches_the_released_code_over_steps(assignment):
    ref, module = build(assignment)
    first_prototypes = ref.prototypes  # what the release's optimiser holds
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    assert "prototypes" not in dict(module.named_parameters())
    gen = torch.Generator().manual_seed(SEED)
    weights = torch.Generator().manual_seed(99)
    moved_by_noise = 0
    for step in range(STEPS):
        what = f"{assignment} step {step}"
        x, labels = batch(step)
        noise = draw_noise(gen, B * GRID[0] * GRID[1]) if assignment == "gumbel" else None
        x_ref = x.clone().requires_grad_(True)
        seg, proto_logits, target, ppc, ppd = ref(x_ref, labels, noise)
        labelled = _check_margins(ref.checks, assignment, what)

        features = x.clone().requires_grad_(True)
        out = module(features, labels)
        close(out.logits, seg, f"{what} logits")
        close(out.proto_logits, proto_logits, f"{what} prototype logits")
        assert torch.equal(out.target, target.long()), what
        assert int(out.labelled) == labelled, what
        assert int(out.correct) == int(ref.checks["correct"].sum()), what
        if labelled:
            close(out.ppc, ppc, f"{what} PPC")
            close(out.ppd, ppd, f"{what} PPD")
        else:  # the release: 0 / 0; the module: 0, still in the graph
            assert ppc.isnan() and ppd.isnan(), what
            assert out.ppc.item() == 0 and out.ppd.item() == 0, what
            assert out.ppc.grad_fn is not None and out.ppd.grad_fn is not None, what
        close(module.prototypes, ref.prototypes, f"{what} prototypes")
        if assignment == "gumbel":
            assert torch.equal(module.generator_state(), gen.get_state()), what
            # The noise moves other prototypes than the targets (the released quirk).
            for plan, picked in zip(ref.checks["plans"], ref.checks["picks"], strict=True):
                moved_by_noise += int((picked != plan.argmax(1)).sum())
        else:
            assert module.generator_state().numel() == 0, what  # nothing drawn

        # The gradients of each output on its own, then one optimiser step on their sum.
        r = torch.randn(seg.shape, generator=weights, dtype=torch.float64)
        params = dict(module.named_parameters())
        ref_params = dict(ref.named_parameters())
        ours = [features, *(params[n] for n in PARAMS)]
        theirs = [x_ref, *(ref_params[RELEASED_NAMES[n]] for n in PARAMS)]
        outputs = [(out.logits * r).sum(), out.ppc, out.ppd]
        ref_outputs = [(seg * r).sum()]
        if labelled:
            ref_outputs += [ppc, ppd]
        else:
            ref_outputs += [x_ref.sum() * 0, x_ref.sum() * 0]
        got, want = grads(outputs, ours), grads(ref_outputs, theirs)
        for i, name in itertools.product(range(3), range(len(ours))):
            key = "features" if name == 0 else PARAMS[name - 1]
            close(got[i][name], want[i][name], f"{what} d{['logits', 'ppc', 'ppd'][i]}/d{key}")
        opt.zero_grad()
        ref_opt.zero_grad()
        sum(outputs).backward()
        sum(ref_outputs).backward()
        if step == 0:  # the release's first prototypes get a gradient the model never reads
            assert first_prototypes.grad is not None and first_prototypes.grad.abs().sum() > 0
        opt.step()
        ref_opt.step()
        for name in PARAMS:
            close(params[name], ref_params[RELEASED_NAMES[name]], f"{what} {name} after SGD")
        assert ref.prototypes is not first_prototypes
        close(module.prototypes, ref.prototypes, f"{what} prototypes after SGD")
    if assignment == "gumbel":
        assert moved_by_noise > 0


def test_released_gumbel_softmax_draws_the_same_one_hot():
    """The released per-class ``F.gumbel_softmax`` calls, fed by the global generator seeded
    like the module's, pick the prototypes the module's single draw picks (on the CPU a draw
    in pieces gives the numbers of one draw)."""
    ref, module = build("gumbel")
    x, labels = batch(0)
    gen = torch.Generator().manual_seed(SEED)
    noise = draw_noise(gen, B * GRID[0] * GRID[1])
    ref(x, labels, noise)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        released = [
            F.gumbel_softmax(plan, tau=TAU, hard=True).argmax(1) for plan in ref.checks["plans"]
        ]
    assert torch.equal(torch.cat(released), torch.cat(ref.checks["picks"]))


def test_all_ignored_losses_are_zero_with_a_graph():
    _, module = build("gumbel")
    x, labels = batch(3)
    before = module.prototypes.clone()
    features = x.clone().requires_grad_(True)
    out = module(features, labels)
    assert int(out.labelled) == 0 and int(out.updated) == 0
    assert out.ppc.item() == 0 and out.ppd.item() == 0
    (out.ppc + out.ppd).backward()
    assert features.grad is not None and features.grad.abs().max() == 0
    close(module.prototypes, F.normalize(before, dim=-1), "prototypes")
    assert (out.target == TARGET_IGNORE).all()


def test_gradcheck_of_logits_and_losses():
    """float64 gradcheck of (logits, PPC, PPD) in the features and every parameter; each call
    starts from the same state, so the assignment (and the noise) is the same every time."""
    torch.manual_seed(3)
    module = PrototypeClassifier(3, 4, 2, dim=3, seed=1).double()
    with torch.no_grad():
        for norm in (module.feat_norm, module.mask_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([[[0, 1, 2, 255], [2, 2, 0, 1], [1, 0, 255, 2]]])
    names = [n for n, _ in module.named_parameters()]

    def run(features, *params):
        module.load_state_dict(state)
        out = torch.func.functional_call(
            module, dict(zip(names, params, strict=True)), (features, labels)
        )
        return out.logits, out.ppc, out.ppd

    inputs = (
        x.requires_grad_(True),
        *(p.detach().clone().requires_grad_(True) for p in module.parameters()),
    )
    # The choices the check relies on are clear of ties by far more than its perturbation.
    module.load_state_dict(state)
    embed = module.embed(x)
    cos = embed @ F.normalize(module.prototypes, dim=-1).reshape(6, 3).T
    assert gap(cos.reshape(-1, 3, 2)) > 1e-3
    assert gap(module.mask_norm(cos.reshape(-1, 3, 2).amax(2))) > 1e-3
    cls = module.grid_labels(labels, (3, 4))
    own = cos.reshape(-1, 3, 2)[torch.arange(12), cls.clamp(max=2)]
    plan = segment_sinkhorn(own, cls, 4)
    assert gap(plan[cls < 3]) > 1e-3
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
