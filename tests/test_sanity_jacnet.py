"""JacNet: the line integral against closed forms, the inverse, the Lipschitz activation, tolerance annealing."""

from __future__ import annotations

import math

import pytest
import torch

from flowbench.errors import ConfigError, InverseNotAvailable
from flowbench.sanity.jacnet import (
    FixedJacNet,
    JacNet,
    ToleranceSchedule,
    derivative_range,
    lipschitz_certificate,
    path_gap,
    train_jacnet,
)
from flowbench.sanity.jacnet_tasks import make_data

# dopri5 controls the *local* error per step; over the few steps here the global error stays within a small
# multiple of the tolerance (measured: 5–10×). 20× is the documented allowance.
GLOBAL = 20


@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-7])
def test_line_integral_of_cos_is_sin(tol):
    model = FixedJacNet(lambda p: torch.cos(p).unsqueeze(-1)).double()
    x = torch.linspace(-3, 3, 41, dtype=torch.float64).unsqueeze(1)
    err = (model(x, rtol=tol, atol=tol) - torch.sin(x)).abs().max()
    assert err <= GLOBAL * tol


def test_line_integral_from_nonzero_initial_condition_and_vector_output():
    # d_x = 1, d_y = 2: J = (cos x, 2x) from (x0, y0) = (1, (sin 1, 1)) gives (sin x, x²).
    model = FixedJacNet(
        lambda p: torch.stack([torch.cos(p[:, 0]), 2 * p[:, 0]], 1).unsqueeze(-1),
        d_x=1,
        d_y=2,
        x0=torch.tensor([1.0]),
        y0=torch.tensor([math.sin(1.0), 1.0]),
    ).double()
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).unsqueeze(1)
    expected = torch.cat([torch.sin(x), x**2], 1)
    assert (model(x, 1e-8, 1e-8) - expected).abs().max() <= GLOBAL * 1e-8 * 4


def test_path_gap_closed_forms():
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [2.0, -1.0]], dtype=torch.float64)
    conservative = FixedJacNet(lambda p: torch.stack([torch.cos(p[:, 0]), p[:, 1]], 1).unsqueeze(1), d_x=2).double()
    assert path_gap(conservative, x).max() <= GLOBAL * 1e-7 * 3
    # Rotation field J = (−x₂, x₁): 0 along the straight path, −|x|²/3 along c = t·x + t(1−t)·Rx.
    rotation = FixedJacNet(lambda p: torch.stack([-p[:, 1], p[:, 0]], 1).unsqueeze(1), d_x=2).double()
    torch.testing.assert_close(path_gap(rotation, x), x.pow(2).sum(1) / 3, rtol=1e-5, atol=1e-6)
    # In 1-D every field is conservative: a learned J gives the same value on both paths.
    torch.manual_seed(0)
    assert path_gap(JacNet(1, 1).double(), x[:, :1]).max() <= GLOBAL * 1e-7 * 3


def test_inverse_of_closed_form_exp_is_log():
    model = FixedJacNet(lambda p: torch.exp(p).unsqueeze(-1), activation="invertible", y0=torch.ones(1)).double()
    y = torch.linspace(0.2, 7.0, 30, dtype=torch.float64).unsqueeze(1)
    assert (model.inverse(y, 1e-8, 1e-8) - torch.log(y)).abs().max() <= GLOBAL * 1e-8 * 3


@pytest.fixture(scope="module")
def trained_exp():
    """The exp task as in the paper (5 points, 50 iterations, lr 0.01, annealing), trained once."""
    x_train, x_test = make_data(3)
    torch.manual_seed(3)
    model = JacNet(1, 1, activation="invertible", y0=torch.ones(1)).double()
    hist = train_jacnet(model, x_train, torch.exp(x_train), iters=50)
    return model, hist, x_train, x_test


def test_inverse_of_trained_exp_task_recovers_x_on_test_range(trained_exp):
    model, _, _, x_test = trained_exp
    assert x_test.min() < -1.5 and x_test.max() > 1.5  # the whole test range [−2, 2], not just the data
    with torch.no_grad():
        back = model.inverse(model(x_test, 1e-8, 1e-8), 1e-8, 1e-8)
    # The inverse ODE amplifies the forward error by 1/J (J ≥ ε): still far inside a loose 1e-3.
    assert (back - x_test).abs().max() < 1e-3
    assert derivative_range(model)[0] > 0  # the invertible activation: strictly positive derivative


def test_tolerance_schedule_halves_exactly_when_loss_below_tolerance():
    s = ToleranceSchedule(0.1)
    for loss in [0.5, 0.09, 0.09, 0.04, 0.05, 0.01]:
        s.step(loss)
    # 0.5 ≥ 0.1 keep; 0.09 < 0.1 halve → 0.05; 0.09 ≥ 0.05 keep; 0.04 < 0.05 → 0.025; 0.05 keep; 0.01 → 0.0125
    assert s.history == [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    assert s.tol == 0.0125
    s2 = ToleranceSchedule(0.1)
    s2.step(0.1)  # equal is not below: no halving
    assert s2.tol == 0.1


def test_training_records_the_schedule_it_used(trained_exp):
    _, hist, _, _ = trained_exp
    loss, tol = hist["loss"], hist["tolerance"]
    assert tol[0] == 0.1 and len(tol) == len(loss) == 50
    for i in range(len(loss) - 1):
        assert tol[i + 1] == (tol[i] / 2 if loss[i] < tol[i] else tol[i])
    assert hist["final_tolerance"] == (tol[-1] / 2 if loss[-1] < tol[-1] else tol[-1])
    assert min(tol) < 0.1 and all(n > 0 for n in hist["nfe"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lipschitz_activation_bounds_every_derivative_at_init(seed):
    torch.manual_seed(seed)
    model = JacNet(1, 1, activation="lipschitz", k=0.5).double()
    with torch.no_grad():  # push the raw output far out: the activation must still bound it
        model.net[-1].bias.fill_(5.0)
    lo, hi = derivative_range(model, -5, 5)
    assert -0.5 <= lo and hi <= 0.5
    # The unconstrained baseline with the very same weights is not bounded (it is the raw output).
    torch.manual_seed(seed)
    base = JacNet(1, 1, activation="unconstrained").double()
    base.load_state_dict(model.state_dict())
    assert derivative_range(base, -5, 5)[1] > 0.5


@pytest.mark.slow
def test_lipschitz_activation_holds_after_training_and_baseline_violates():
    # Target y = 3x wants slope 3; with k = 1 the JacNet cannot follow, the unconstrained net does.
    x_train, _ = make_data(3)
    runs = {}
    for act in ("lipschitz", "unconstrained"):
        torch.manual_seed(3)
        model = JacNet(1, 1, activation=act, k=1.0).double()
        train_jacnet(model, x_train, 3 * x_train, iters=40, lr=0.03)
        runs[act] = model
    lo, hi = derivative_range(runs["lipschitz"], -3, 3)
    assert -1.0 <= lo and hi <= 1.0
    assert lipschitz_certificate(runs["lipschitz"], -3, 3) <= 1.0
    assert derivative_range(runs["unconstrained"], -3, 3)[1] > 1.5  # shown: the baseline leaves [−1, 1]


def test_certificate_agrees_with_the_learned_derivative():
    torch.manual_seed(0)
    model = JacNet(1, 1, activation="lipschitz", k=2.0).double()
    grid_max = derivative_range(model, -2, 2, points=301)[1]
    assert lipschitz_certificate(model, points=301) == pytest.approx(grid_max, rel=1e-6)


def test_errors():
    with pytest.raises(ConfigError, match="d_x = d_y"):
        JacNet(2, 1, activation="invertible")
    with pytest.raises(ConfigError, match="activation"):
        JacNet(activation="softplus")
    with pytest.raises(InverseNotAvailable):
        JacNet(activation="lipschitz").inverse(torch.zeros(1, 1))
    with pytest.raises(ConfigError, match="shape"):
        JacNet(2, 1)(torch.zeros(3, 1))


def test_inverse_in_two_dimensions_closed_form():
    # J = diag(exp x): ŷ = exp(x) elementwise from (0, 1); the inverse ODE must give log y.
    model = FixedJacNet(
        lambda p: torch.diag_embed(torch.exp(p)), d_x=2, d_y=2, activation="invertible", y0=torch.ones(2)
    ).double()
    y = torch.tensor([[0.5, 2.0], [3.0, 0.3], [1.0, 1.0]], dtype=torch.float64)
    assert (model.inverse(y, 1e-8, 1e-8) - torch.log(y)).abs().max() <= GLOBAL * 1e-8 * 3
    x = torch.log(y)
    assert (model(x, 1e-8, 1e-8) - y).abs().max() <= GLOBAL * 1e-8 * 3
