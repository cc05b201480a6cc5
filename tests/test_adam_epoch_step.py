"""``--adam-epoch-step``: the relgrad reference code's Adam (bias correction counted in epochs), float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowbench.models import build_model
from flowbench.training import Trainer
from flowbench.training.optim import EpochStepAdam


def jax_adam_reference(grads_per_epoch, x0, lr, b1=0.9, b2=0.999, eps=1e-8):
    """``jax.experimental.optimizers.adam`` driven as in fissoreg/relative-gradient-jacobian's train():
    ``opt_update(i, g, state)`` for every batch of epoch ``i`` (0-based)."""
    x, m, v = x0.copy(), np.zeros_like(x0), np.zeros_like(x0)
    for i, grads in enumerate(grads_per_epoch):
        for g in grads:
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * g**2 + b2 * v
            mhat, vhat = m / (1 - b1 ** (i + 1)), v / (1 - b2 ** (i + 1))
            x = x - lr * mhat / (np.sqrt(vhat) + eps)
    return x


def test_optimizer_matches_the_reference_update_on_fixed_gradients():
    rng = np.random.RandomState(0)
    epochs = [[rng.randn(5) for _ in range(4)] for _ in range(3)]
    x0 = rng.randn(5)
    p = torch.nn.Parameter(torch.tensor(x0))
    opt = EpochStepAdam([p], lr=1e-2)
    for e, grads in enumerate(epochs, 1):
        opt.epoch = e
        for g in grads:
            p.grad = torch.tensor(g)
            opt.step()
    expected = jax_adam_reference(epochs, x0, 1e-2)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-13, atol=1e-15)
    # and it is not torch's Adam: per-step counting gives a different point
    q = torch.nn.Parameter(torch.tensor(x0))
    ref = torch.optim.Adam([q], lr=1e-2)
    for grads in epochs:
        for g in grads:
            q.grad = torch.tensor(g)
            ref.step()
    assert np.abs(q.detach().numpy() - expected).max() > 1e-3


@pytest.mark.parametrize("epoch_step", [True, False])
def test_trainer_on_relgrad_reproduces_the_authors_loop(epoch_step):
    """Two epochs of relgrad through the Trainer = the reference loop on the same batches (float64)."""
    torch.manual_seed(0)
    dim, n, bs, lr = 3, 40, 10, 1e-2
    x = torch.randn(n, dim, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.3, 0.0], [0, 1, 0.5], [0, 0, 1]], dtype=torch.float64
    )
    flow = build_model("relgrad", dim).double()
    ref = build_model("relgrad", dim).double()
    ref.load_state_dict(flow.state_dict())
    trainer = Trainer(
        flow,
        x,
        x[:10],
        lr=lr,
        weight_decay=0.0,
        batch_size=bs,
        max_epochs=2,
        seed=5,
        progress=False,
        adam_epoch_step=epoch_step,
    )
    res = trainer.fit()
    assert res.best_epoch == 2  # no best-state restore to an earlier epoch: the final point is compared
    assert isinstance(trainer.optimizer, EpochStepAdam) == epoch_step

    # the reference: same shuffles (the trainer's generator), gradients of ref at the current point
    params = list(ref.parameters())
    shapes = [p.shape for p in params]
    gen = torch.Generator().manual_seed(5)

    xs = torch.cat([p.detach().flatten() for p in params]).numpy()
    m, v, step = np.zeros_like(xs), np.zeros_like(xs), 0
    for i in range(2):
        perm = torch.randperm(n, generator=gen)
        for j in range(0, n, bs):
            # load the flat point into ref, take its (relative) gradient
            off = 0
            with torch.no_grad():
                for p, s in zip(params, shapes):
                    k = int(np.prod(s))
                    p.copy_(torch.from_numpy(xs[off : off + k]).view(s))
                    off += k
            ref.zero_grad()
            ref.train()
            (-ref.train_log_prob(x[perm[j : j + bs]]).mean()).backward()
            g = torch.cat([p.grad.flatten() for p in params]).numpy()
            step += 1
            t = i + 1 if epoch_step else step
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g**2
            xs = xs - lr * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    got = torch.cat([p.detach().flatten() for p in flow.parameters()]).numpy()
    np.testing.assert_allclose(got, xs, rtol=1e-9, atol=1e-11)
