"""The fast forms of the RKD angle, FSP and AB losses equal straightforward reference computations (values and
gradients) on random tensors: issue 19's speed work must not change what the methods compute."""
import pytest
import torch
import torch.nn.functional as F

from edgekd.distill.ab import ab_loss
from edgekd.distill.fsp import _pooled_to, fsp_distance, fsp_loss, fsp_matrix
from edgekd.distill.rkd import rkd_angle_loss


def grads(loss_fn, *tensors):
    """loss_fn's value and its gradients w.r.t. copies of `tensors` (leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = loss_fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def close(a, b, rtol=1e-5, atol=1e-8):
    return torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


# ---- RKD angle --------------------------------------------------------------------------------------------

def reference_angles(e: torch.Tensor) -> torch.Tensor:
    """Eq. 8 as written: unit differences (zero for a zero difference), all their dot products."""
    e = e.flatten(1)
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[j, i] = unit(e_i - e_j)
    return (diff @ diff.transpose(1, 2)).flatten()


def reference_angle_loss(student, teacher):
    return F.smooth_l1_loss(reference_angles(student.float()), reference_angles(teacher.float()).detach())


def test_rkd_angle_equals_the_reference_in_value_and_gradient():
    torch.manual_seed(0)
    for b, ds, dt, offset in [(12, 5, 9, 0.0), (32, 40, 64, 3.0), (7, 2, 3, 0.0)]:
        # an offset common to all embeddings (pooled non-negative features) must not cost precision
        s, t = torch.randn(b, ds) + offset, torch.rand(b, dt) + offset
        want, want_grad = grads(lambda s: reference_angle_loss(s, t), s)
        # the reference in float64: what float32 rounding is measured against
        exact, exact_grad = grads(lambda s: F.smooth_l1_loss(reference_angles(s), reference_angles(t.double())),
                                  s.double())
        got, got_grad = grads(lambda s: rkd_angle_loss(s, t), s)
        assert got.dtype == torch.float32 and got_grad[0].dtype == torch.float32
        assert close(got, want, rtol=1e-5), (b, got, want)
        assert close(got_grad[0], want_grad[0], rtol=1e-4, atol=1e-7 * want_grad[0].abs().max())
        # at least as accurate as the direct float32 form
        err_new = (got_grad[0].double() - exact_grad[0]).norm()
        err_ref = (want_grad[0].double() - exact_grad[0]).norm()
        assert err_new <= 2 * err_ref + 1e-12 * exact_grad[0].norm()


def test_rkd_angle_handles_coinciding_embeddings_like_the_reference():
    """A zero difference normalises to the zero vector: every angle at e_j involving i == j (or a duplicate of
    e_j) is 0, the same cosines as the reference in the same (j, i, k) order, with no inf/nan."""
    from edgekd.distill.rkd import _angles

    torch.manual_seed(1)
    s, t = torch.randn(9, 6), torch.randn(9, 11)
    want, (want_grad,) = grads(lambda s: reference_angle_loss(s, t), s)
    got, (got_grad,) = grads(lambda s: rkd_angle_loss(s, t), s)
    assert close(got, want) and close(got_grad, want_grad, rtol=1e-4, atol=1e-6 * want_grad.abs().max())
    s[4], t[7] = s[2], t[1]  # exact duplicates on both sides
    got_angles, want_angles = _angles(s), reference_angles(s)
    assert torch.allclose(got_angles, want_angles, atol=1e-6)
    assert torch.equal(got_angles == 0, want_angles == 0)  # exact zeros exactly where the reference has them
    want, (want_grad,) = grads(lambda s: reference_angle_loss(s, t), s)
    got, (got_grad,) = grads(lambda s: rkd_angle_loss(s, t), s)
    assert close(got, want) and torch.isfinite(got_grad).all()
    # the rows without a duplicate get the reference's gradient; a duplicated student pair (s_2 == s_4) gets a
    # finite one: the reference divides by normalize's eps (1e-12) there, since the teacher's angles at that pair
    # are not 0, which blows its gradient up to ~1e8 (the direction of a zero difference is undefined)
    rows = [i for i in range(9) if i not in (2, 4)]
    assert close(got_grad[rows], want_grad[rows], rtol=1e-4, atol=1e-6 * want_grad[rows].abs().max())
    assert want_grad[[2, 4]].abs().max() > 1e6 > 1 > got_grad[[2, 4]].abs().max()


def test_rkd_angle_is_scale_and_width_invariant():
    torch.manual_seed(2)
    e = torch.randn(10, 16)
    assert rkd_angle_loss(torch.cat([e, e], 1) * 3, e).item() == pytest.approx(0.0, abs=1e-8)


# ---- FSP ----------------------------------------------------------------------------------------------------

def reference_fsp_loss(student_feats, teacher_feats):
    """mean over pairs of mean((G_s - G_t)^2), G with torch's adaptive max pooling, as first written."""
    def matrix(f1, f2):
        if f1.shape[-2:] != f2.shape[-2:]:
            h = min(f1.shape[-2], f2.shape[-2]), min(f1.shape[-1], f2.shape[-1])
            f1, f2 = F.adaptive_max_pool2d(f1, h), F.adaptive_max_pool2d(f2, h)
        return f1.flatten(2) @ f2.flatten(2).transpose(1, 2) / (f1.shape[-2] * f1.shape[-1])
    losses = [(matrix(s1, s2) - matrix(t1, t2)).pow(2).mean()
              for s1, s2, t1, t2 in zip(student_feats, student_feats[1:], teacher_feats, teacher_feats[1:])]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("shapes", [
    # (student maps, teacher maps): each (C, H, W); the deepest pair of the benchmark (2 x 2 maps, 1280 channels)
    # takes the kernel route, the shallow ones the direct route; non-dividing sizes use adaptive pooling
    ([(6, 8, 8), (10, 4, 4), (12, 2, 2), (160, 2, 2)], [(6, 8, 8), (10, 4, 4), (12, 2, 2), (160, 2, 2)]),
    ([(6, 8, 8), (10, 4, 4), (96, 2, 2)], [(6, 4, 4), (10, 2, 2), (96, 1, 1)]),  # student maps twice the size
    ([(5, 7, 7), (9, 3, 3), (7, 3, 3)], [(5, 7, 7), (9, 3, 3), (7, 3, 3)]),
])
def test_fsp_loss_equals_the_reference_in_value_and_gradient(shapes):
    torch.manual_seed(0)
    s_shapes, t_shapes = shapes
    student = [torch.randn(4, *c) for c in s_shapes]
    teacher = [torch.randn(4, *c) for c in t_shapes]
    # a student that nearly matches (the small-loss end, where the kernel route's sums cancel) and one that doesn't
    near = [t + 0.01 * torch.randn_like(t) for t in teacher] if s_shapes == t_shapes else student
    for s in (student, near):
        want, want_grad = grads(lambda *s: reference_fsp_loss(list(s), teacher), *s)
        exact, exact_grad = grads(lambda *s: reference_fsp_loss(list(s), [t.double() for t in teacher]),
                                  *[f.double() for f in s])
        got, got_grad = grads(lambda *s: fsp_loss(list(s), teacher), *s)
        assert got.dtype == torch.float32
        assert close(got, want, rtol=1e-5) and close(got, exact, rtol=1e-5)
        for g, w, x in zip(got_grad, want_grad, exact_grad):
            assert g.dtype == torch.float32
            # float32 rounding: as far from the float64 gradient as the reference's float32 one, at most
            err_new, err_ref = ((g.double() - x).abs().max(), (w.double() - x).abs().max())
            assert err_new <= 2 * err_ref + 1e-6 * x.abs().max(), (err_new, err_ref)
            assert torch.equal(g == 0, w == 0)  # max pooling routes the gradient to the same positions


@pytest.mark.parametrize("c1,c2,n_s,n_t", [(3, 5, 16, 16), (40, 300, 4, 4), (50, 200, 4, 1), (8, 8, 9, 4)])
def test_fsp_distance_routes_equal_the_gram_difference(c1, c2, n_s, n_t):
    torch.manual_seed(3)
    s1, s2 = torch.randn(3, c1, n_s), torch.randn(3, c2, n_s)
    t1, t2 = torch.randn(3, c1, n_t), torch.randn(3, c2, n_t)

    def reference(s1, s2):
        g_s, g_t = s1 @ s2.transpose(1, 2) / n_s, t1.double() @ t2.double().transpose(1, 2) / n_t
        return (g_s - g_t).pow(2).mean()
    exact, exact_grad = grads(reference, s1.double(), s2.double())
    got, got_grad = grads(lambda a, b: fsp_distance(a, b, t1, t2), s1, s2)
    assert close(got, exact, rtol=1e-6)
    for g, x in zip(got_grad, exact_grad):
        assert close(g, x, rtol=1e-5, atol=1e-6 * x.abs().max())


def test_fsp_matrix_is_unchanged():
    torch.manual_seed(4)
    f1, f2 = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    want = F.adaptive_max_pool2d(f1, (4, 4)).flatten(2) @ f2.flatten(2).transpose(1, 2) / 16
    assert torch.allclose(fsp_matrix(f1, f2), want)


def test_pooling_matches_adaptive_max_pool_with_ties():
    """max_pool2d replaces adaptive_max_pool2d when the sizes divide: same values and, ties included (ReLU zeros,
    rounded values), the same gradient routing; a map already at the size passes through untouched."""
    torch.manual_seed(5)
    f = torch.relu(torch.randn(2, 3, 8, 12)).round()
    for size in [(4, 6), (2, 3), (8, 12), (1, 1)]:
        g = torch.randn(2, 3, *size)
        want, (want_grad,) = grads(lambda f: (F.adaptive_max_pool2d(f, size) * g).sum(), f)
        got, (got_grad,) = grads(lambda f: (_pooled_to(f, size) * g).sum(), f)
        assert torch.equal(got, want) and torch.equal(got_grad, want_grad), size
    assert _pooled_to(f, (8, 12)) is f
    odd = torch.randn(1, 2, 7, 7)  # 7 -> 3 does not divide: torch's adaptive pooling itself
    assert torch.equal(_pooled_to(odd, (3, 3)), F.adaptive_max_pool2d(odd, (3, 3)))


# ---- AB -----------------------------------------------------------------------------------------------------

def reference_ab_loss(student, teacher, margin):
    s, on = student.float(), teacher.float() > 0
    loss = torch.where(on, (s - margin).pow(2) * (s < margin), (s + margin).pow(2) * (s > -margin))
    return loss.sum() / s.shape[0]


@pytest.mark.parametrize("margin", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.float16])
def test_ab_loss_is_bitwise_the_two_branch_form(margin, teacher_dtype):
    torch.manual_seed(6)
    s = torch.randn(4, 6, 5, 5) * 2
    s[0, 0, 0, :3] = torch.tensor([margin, -margin, 0.0])  # on the hinges' kinks
    t = torch.randn(4, 6, 5, 5).to(teacher_dtype)
    t[1, 1, 1, :2] = 0.0  # exactly at the boundary: off
    want, (want_grad,) = grads(lambda s: reference_ab_loss(s, t, margin), s)
    got, (got_grad,) = grads(lambda s: ab_loss(s, t, margin), s)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
