"""K-FAC numerics in one process: factors, both methods against direct computations, guards."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtune.optim import KFAC, KFACConfig, Method, Milestones
from dtune.optim._layers import im2col
from tests.optim import _loops as L


def _two_layer() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3, bias=False))


def _batch(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(size, 5, generator=generator), torch.randint(0, 3, (size,), generator=generator)


def _direct(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(A, G, gradient matrix) of both layers, computed from their definitions in float64."""
    first, _, second = model
    s1 = first(x)
    s1.retain_grad()
    h = torch.tanh(s1)
    s2 = second(h)
    s2.retain_grad()
    F.cross_entropy(s2, y).backward()
    n = x.shape[0]
    a1 = torch.cat([x, torch.ones(n, 1)], 1).double()
    # per-example gradients of a mean loss are n * the batch gradients: G = E[(n g)(n g)^T]
    g1, g2 = n * s1.grad.double(), n * s2.grad.double()
    grad1 = torch.cat([first.weight.grad, first.bias.grad[:, None]], 1).double()
    return [
        (a1.T @ a1 / n, g1.T @ g1 / n, grad1),
        (h.double().T @ h.double() / n, g2.T @ g2 / n, second.weight.grad.double()),
    ]


def _kfac_grads(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, **options) -> list[torch.Tensor]:
    kfac = KFAC(model, kl_clip=None, **options)
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    first, _, second = model
    return [torch.cat([first.weight.grad, first.bias.grad[:, None]], 1), second.weight.grad]


def test_inverse_method_equals_direct_damped_inverses_on_a_hand_built_two_layer_net():
    model = _two_layer()
    x, y = _batch()
    got = _kfac_grads(copy.deepcopy(model), x, y, method=Method.INVERSE, damping=0.1)
    for (a, g, grad), result in zip(_direct(model, x, y), got, strict=True):
        eye_a, eye_g = torch.eye(len(a), dtype=a.dtype), torch.eye(len(g), dtype=g.dtype)
        want = torch.linalg.solve(g + 0.1 * eye_g, grad) @ torch.linalg.inv(a + 0.1 * eye_a)
        torch.testing.assert_close(result.double(), want, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(result.double(), grad, rtol=0.1)  # it did precondition


def test_eigen_method_applies_the_damped_kronecker_inverse_exactly():
    model = _two_layer()
    x, y = _batch()
    got = _kfac_grads(copy.deepcopy(model), x, y, method=Method.EIGEN, damping=0.1)
    for (a, g, grad), result in zip(_direct(model, x, y), got, strict=True):
        fisher = torch.kron(g, a) + 0.1 * torch.eye(len(a) * len(g), dtype=a.dtype)
        want = torch.linalg.solve(fisher, grad.reshape(-1)).reshape(grad.shape)  # row-major vec
        torch.testing.assert_close(result.double(), want, rtol=1e-4, atol=1e-6)


def test_eigen_and_inverse_agree_where_both_are_exact():
    # One Linear layer, a regression loss and 256 examples: both factors are full rank and well
    # conditioned, so with vanishing damping both methods compute G^-1 grad A^-1, the exact
    # natural gradient of the Kronecker-factored Fisher block.
    generator = torch.Generator().manual_seed(5)
    x, target = torch.randn(256, 4, generator=generator), torch.randn(256, 3, generator=generator)
    results = {}
    for method in (Method.EIGEN, Method.INVERSE):
        torch.manual_seed(0)
        layer = nn.Linear(4, 3)
        kfac = KFAC(layer, method=method, damping=1e-6, kl_clip=None)
        out = layer(x)
        out.retain_grad()
        F.mse_loss(out, target).backward()
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
        a = torch.cat([x, torch.ones(256, 1)], 1).double()
        g = 256 * out.grad.double()
        exact = torch.linalg.solve(g.T @ g / 256, grad) @ torch.linalg.inv(a.T @ a / 256)
        kfac.step()
        results[method] = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
        torch.testing.assert_close(results[method], exact, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(results[Method.EIGEN], results[Method.INVERSE], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
        nn.Conv2d(2, 3, 3, dilation=2, padding=2),
        nn.Conv2d(2, 3, 3, padding="same"),
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["pad1", "stride-rect-nobias", "dilation", "same", "reflect"],
)
def test_im2col_matches_unfold(conv):
    x = torch.randn(4, 2, 7, 6)
    padded = x
    if conv.padding_mode != "zeros" or conv.padding == "same":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    else:
        padding = conv.padding
    want = F.unfold(padded, conv.kernel_size, conv.dilation, padding, conv.stride)  # N, D, L
    assert torch.equal(im2col(x, conv), want.transpose(0, 1).reshape(want.shape[1], -1))
    out = conv(x)  # the patches reproduce the convolution
    weight = conv.weight.reshape(conv.out_channels, -1)
    manual = (weight @ im2col(x, conv)).reshape(conv.out_channels, x.shape[0], *out.shape[2:])
    bias = 0 if conv.bias is None else conv.bias[:, None, None, None]
    torch.testing.assert_close((manual + bias).transpose(0, 1), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [None, 50], ids=["one-chunk", "chunks-of-one-example"])
def test_conv_factors_follow_kfc_definitions(monkeypatch, chunk):
    if chunk is not None:  # im2col of a few examples at a time gives the same sums
        monkeypatch.setattr("dtune.optim._layers._CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    conv, head = nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Linear(3 * 4 * 4, 4)
    x, y = torch.randn(6, 2, 7, 7), torch.randint(0, 4, (6,))
    kfac = KFAC(conv, kl_clip=None)
    out = conv(x)
    out.retain_grad()
    F.cross_entropy(head(out.flatten(1)), y).backward()
    kfac.step()
    n, positions = x.shape[0], out.shape[2] * out.shape[3]
    patches = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(n * positions, -1)
    a = torch.cat([patches, torch.ones(len(patches), 1)], 1)
    g = out.grad.permute(0, 2, 3, 1).reshape(n * positions, -1) * n
    layer = kfac.layers[0]
    torch.testing.assert_close(layer.A, a.T @ a / n, rtol=1e-5, atol=1e-5)  # sum over positions
    torch.testing.assert_close(layer.G, g.T @ g / (n * positions), rtol=1e-5, atol=1e-8)  # mean


def test_factor_examples_takes_statistics_from_the_first_examples_only():
    model, (x, y) = _two_layer(), _batch(64)
    limited, subset = copy.deepcopy(model), copy.deepcopy(model)
    kfac_limited = KFAC(limited, factor_examples=16, kl_clip=None)
    F.cross_entropy(limited(x), y).backward()
    kfac_limited.step()
    kfac_subset = KFAC(subset, kl_clip=None)  # per-example gradients do not depend on the batch
    F.cross_entropy(subset(x[:16]), y[:16]).backward()
    kfac_subset.step()
    for a, b in zip(kfac_limited.layers, kfac_subset.layers, strict=True):
        torch.testing.assert_close(a.A, b.A)
        torch.testing.assert_close(a.G, b.G, rtol=1e-4, atol=1e-6)


def test_in_place_activations_are_tolerated():
    x, y = L.global_batch(0)
    results = []
    for inplace in (False, True):
        model = L.make_cnn(inplace=inplace)
        kfac = KFAC(model, damping=0.05, kl_clip=None)
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        results.append([p.grad.clone() for p in model.parameters()])
    for plain, inplace in zip(*results, strict=True):
        torch.testing.assert_close(plain, inplace)


def test_other_modules_are_skipped_with_one_notice(caplog):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 1, groups=2),
                          nn.Linear(4, 2))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="dtune.optim"):
        kfac = KFAC(model, skip_layers=["4"])
    assert [layer.name for layer in kfac.layers] == ["1"]
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1
    assert (
        "0 (Embedding)" in notices[0]
        and "2 (LayerNorm)" in notices[0]
        and "grouped convolution" in notices[0]
    )
    assert "4 (" not in notices[0]  # skipped on request: no notice


def test_a_layer_never_called_is_left_alone_with_a_notice(caplog):
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    kfac = KFAC(model, kl_clip=None)
    model["used"](torch.randn(8, 3)).square().mean().backward()
    model["unused"].weight.grad = torch.ones(2, 3)
    with caplog.at_level(logging.WARNING, logger="dtune.optim"):
        kfac.step()
        kfac.step()
    assert torch.equal(model["unused"].weight.grad, torch.ones(2, 3))
    assert sum("unused" in r.getMessage() for r in caplog.records) == 1


def test_eigh_failure_is_retried_with_jitter(monkeypatch):
    model, (x, y) = _two_layer(), _batch()
    want = _kfac_grads(copy.deepcopy(model), x, y, damping=0.1)
    real, calls = torch.linalg.eigh, []

    def flaky(matrix):
        calls.append(matrix.clone())
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    got = _kfac_grads(copy.deepcopy(model), x, y, damping=0.1)
    assert len(calls) == 5 and not torch.equal(calls[0], calls[1])  # the retry was jittered
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_persistent_eigh_failure_keeps_the_last_good_decomposition(monkeypatch):
    model, (x, y) = _two_layer(), _batch()
    kfac = KFAC(model, damping=0.1, kl_clip=None, inv_update_steps=1)
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    good = {k: v.clone() for k, v in kfac.layers[0].decomposition.items()}

    def broken(matrix):
        raise torch.linalg.LinAlgError("failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x * 3), y).backward()
        kfac.step()
    assert kfac.layers[0].failures == 4  # A and G, twice
    for key, value in good.items():
        assert torch.equal(kfac.layers[0].decomposition[key], value)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_failure_before_any_success_falls_back_to_the_diagonal_and_nan_factors_are_survived(monkeypatch):
    model, (x, y) = _two_layer(), _batch()
    kfac = KFAC(model, damping=0.1, kl_clip=None, inv_update_steps=1)
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    layer = kfac.layers[0]
    torch.testing.assert_close(layer.decomposition["qa"], torch.eye(layer.a_dim))
    torch.testing.assert_close(layer.decomposition["da"], layer.A.diagonal())
    monkeypatch.undo()
    layer.A[0, 0] = float("nan")  # e.g. after a diverging step
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    torch.testing.assert_close(layer.decomposition["qa"], torch.eye(layer.a_dim))  # kept
    assert torch.isfinite(model[0].weight.grad).all()


def test_kl_clip_scales_by_the_quadratic_form():
    model, (x, y) = _two_layer(), _batch()
    raw = copy.deepcopy(model)
    F.cross_entropy(raw(x), y).backward()
    gradients = [p.grad.clone() for p in raw.parameters()]
    unclipped = _kfac_grads(copy.deepcopy(model), x, y, damping=0.1)
    vg = sum(float((v * g).sum()) for v, g in zip(
        [unclipped[0][:, :5], unclipped[0][:, 5], unclipped[1]], gradients, strict=True))  # fmt: skip
    kfac = KFAC(model, damping=0.1, kl_clip=1e-4, lr=0.5)
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    scale = min(1.0, (1e-4 / (abs(vg) * 0.25)) ** 0.5)
    assert scale < 1
    torch.testing.assert_close(model[2].weight.grad, unclipped[1] * scale, rtol=1e-4, atol=1e-7)


def test_decoupled_update_frequencies_and_schedules(monkeypatch):
    real, decompositions = torch.linalg.eigh, []
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: decompositions.append(1) or real(m))
    model, (x, y) = _two_layer(), _batch()
    # factors every 3 steps; decompositions every 4 steps until step 8, then every 8
    kfac = KFAC(model, factor_update_steps=3, kl_clip=None,
                inv_update_steps=Milestones(base=4, factor=2, milestones=(8,)))  # fmt: skip
    for _ in range(17):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
    assert kfac.layers[0].updates == 6  # steps 0, 3, 6, 9, 12, 15
    assert len(decompositions) == 4 * 4  # steps 0, 4, 8, 16; 2 layers x (A, G)


def test_milestones_never_compound():
    schedule = Milestones.from_epochs(base=0.003, factor=0.5, epochs=(2, 4), steps_per_epoch=10)
    first = [schedule(step) for step in range(60)]
    assert first == [schedule(step) for step in range(60)]  # calling again changes nothing
    assert first[19] == 0.003 and first[20] == first[39] == 0.0015 and first[40] == first[59] == 0.00075


def test_knobs_that_are_functions_are_validated_when_evaluated():
    model, (x, y) = _two_layer(), _batch()
    kfac = KFAC(model, damping=lambda step: 0.1 - 0.1 * step, kl_clip=None, inv_update_steps=1)
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    with pytest.raises(ValueError, match=r"The value of `damping` at step 1 is 0\.0, but must be > 0\."):
        kfac.step()


def test_state_dict_resumes_the_same_trajectory():
    def run(steps, state=None):
        model = L.make_cnn()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        kfac = KFAC(model, damping=0.05, inv_update_steps=2, kl_clip=1e-3)
        kfac.attach(optimizer)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            kfac.load_state_dict(state["kfac"])
            start = kfac.steps
        for step in range(start, steps):
            x, y = L.global_batch(step)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        return copy.deepcopy(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "kfac": kfac.state_dict()}
        )

    straight = run(6)
    resumed = run(6, state=run(4))
    assert resumed["kfac"]["steps"] == 6
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value)
    layer = straight["kfac"]["layers"]["6"]
    torch.testing.assert_close(resumed["kfac"]["layers"]["6"]["A"], layer["A"])
    assert layer["updates"] == 6


def test_state_dict_from_another_model_is_refused():
    kfac = KFAC(_two_layer())
    with pytest.raises(ValueError, match="this model has"):
        kfac.load_state_dict(KFAC(L.make_cnn()).state_dict())
    state = kfac.state_dict()
    state["layers"]["0"]["A"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"factor A of layer '0' has shape \(3, 3\), but must be \(6, 6\)"):
        kfac.load_state_dict(state)


def test_attach_runs_before_every_optimizer_step_and_reads_its_lr():
    model, (x, y) = _two_layer(), _batch()
    want = _kfac_grads(copy.deepcopy(model), x, y, damping=0.1)  # kl_clip off
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9)  # KL-clip inactive at this lr
    kfac = KFAC(model, damping=0.1, kl_clip=1e-3)
    handle = kfac.attach(optimizer)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert kfac.steps == 1
    torch.testing.assert_close(model[2].weight.grad, want[1])
    handle.remove()
    optimizer.step()
    assert kfac.steps == 1
    unattached = KFAC(model, kl_clip=1e-3)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="KL-clip needs the learning rate"):
        unattached.step()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"damping": -1}, ValueError, r"The value of `damping` is -1, but must be > 0\."),
        (
            {"factor_decay": 1.0},
            ValueError,
            r"The value of `factor_decay` is 1\.0, but must be in \[0, 1\)\.",
        ),
        ({"inv_update_steps": 0}, ValueError, r"The value of `inv_update_steps` is 0, but must be >= 1\."),
        ({"factor_examples": 0}, ValueError, r"`factor_examples` is 0, but must be an integer >= 1\."),
        ({"grad_worker_fraction": 0}, ValueError, r"`grad_worker_fraction` is 0, but must be in \(0, 1\]"),
        ({"kl_clip": "0.1"}, TypeError, r"The value of `kl_clip` must be a number, got str\."),
        ({"method": "eigen"}, TypeError, r"`method` must be a dtune\.optim\.Method"),
        ({"skip_layers": "fc"}, TypeError, r"`skip_layers` must be a sequence"),
        ({"skip_layers": ["("]}, ValueError, r"not a valid regular expression"),
        ({"no_such_option": 1}, TypeError, r"no_such_option"),
    ],
)
def test_bad_options_are_refused_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        KFAC(_two_layer(), **options)


def test_config_object_or_keywords_not_both():
    config = KFACConfig(damping=0.2)
    assert KFAC(_two_layer(), config).config.damping == 0.2
    with pytest.raises(TypeError, match="not both"):
        KFAC(_two_layer(), config, damping=0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        KFAC("model")  # type: ignore[arg-type]
