"""Stacked runs (issue 11): stacked run r follows the trajectory of a single run with seed r, per family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FUSED_CPU_ADAM, needs_fused_cpu_adam

import flowbench.models as models
from flowbench.data import load_dataset
from flowbench.errors import ConfigError
from flowbench.models.stacking import StackedRelgradNet
from flowbench.training.stacked import RunSpec, StackedTrainer, parse_seeds
from flowbench.training.trainer import Trainer
from flowbench.utils import seed_everything

#: Small members of every trainable family (fast on CPU); float64 so that equality means the same trajectory.
FAMILIES = {
    "made": dict(hidden=16),
    "made-mog": dict(hidden=16, components=3),
    # batch_norm off for the exact comparison: the last batch norm's β has a gradient that is zero but for
    # rounding, which Adam amplifies (a 1e-15 change of one weight moves it by 2.5e-3 in one epoch of a single
    # run), so no reordering of sums can follow it; test_stacked_batchnorm_follows_rounding covers BN.
    "maf": dict(layers=2, hidden=16, batch_norm=False),
    "maf-mog": dict(layers=2, hidden=16, components=3, batch_norm=False),
    "realnvp": dict(layers=2, hidden=16, batch_norm=False),
    "relgrad": dict(layers=2),
    # dropout 0: with dropout a stack cannot give each run its own masks, so such runs are not stacked
    "nsf-ar": dict(layers=2, hidden=8, blocks=1, bins=4, dropout=0.0),
    "nsf-c": dict(layers=2, hidden=8, blocks=1, bins=4, dropout=0.0),
}
LR = {
    "made": 3e-3,
    "made-mog": 3e-3,
    "maf": 3e-3,
    "maf-mog": 3e-3,
    "realnvp": 3e-3,
    "relgrad": 1e-3,
    "nsf-ar": 1e-3,
    "nsf-c": 1e-3,
}
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    # 400 training rows in batches of 40: 10 steps an epoch, so ≥ 100 steps within the epoch cap
    return (
        torch.tensor(np.asarray(data.train[:400]), dtype=torch.float64),
        torch.tensor(np.asarray(data.val[:200]), dtype=torch.float64),
    )


def _build(model: str, seed: int, train_x, **hparams):
    seed_everything(seed)  # as run_experiment does: initial weights from the seed alone
    flow = models.build_model(model, train_x.shape[1], **{**FAMILIES[model], **hparams}).double()
    flow.initialize(train_x)
    return flow


def _snapshots():
    snaps: dict = {}

    def cb_for(flow_of):
        def cb(info):
            flow = flow_of(info)
            snaps[(getattr(info, "seed", None), info.epoch)] = {
                k: v.detach().clone() for k, v in flow.named_parameters()
            }

        return cb

    return snaps, cb_for


@pytest.mark.parametrize("model", list(FAMILIES))
def test_stacked_run_equals_single_run(model, digits):
    train_x, val_x = digits
    kw = dict(batch_size=40, progress=False)
    singles, single_snaps = {}, {}
    for seed in SEEDS:
        flow = _build(model, seed, train_x)
        snaps: dict = {}
        cb = lambda info, flow=flow, snaps=snaps: snaps.__setitem__(  # noqa: E731
            info.epoch, {k: v.detach().clone() for k, v in flow.named_parameters()}
        )
        tr = Trainer(flow, train_x, val_x, lr=LR[model], patience=2, max_epochs=14, seed=seed, callbacks=[cb], **kw)
        singles[seed], single_snaps[seed] = (tr.fit(), flow), snaps
    flows = [_build(model, seed, train_x) for seed in SEEDS]
    stacked_snaps: dict = {}
    st = StackedTrainer(
        [RunSpec(f, seed, LR[model], patience=2, max_epochs=14) for f, seed in zip(flows, SEEDS)],
        train_x,
        val_x,
        callbacks=[
            lambda info: stacked_snaps.__setitem__(
                (info.seed, info.epoch), {k: v.detach().clone() for k, v in flows[info.run].named_parameters()}
            )
        ],
        **kw,
    )
    results = st.fit()
    for r, seed in enumerate(SEEDS):
        single, flow = singles[seed]
        res = results[r]
        assert (res.epochs, res.best_epoch, res.stop_reason) == (single.epochs, single.best_epoch, single.stop_reason)
        assert res.epochs * 10 >= 100 or "no improvement" in res.stop_reason
        np.testing.assert_allclose(
            [h["val_ll"] for h in res.history], [h["val_ll"] for h in single.history], rtol=0, atol=1e-9
        )
        np.testing.assert_allclose(
            [h["train_loss"] for h in res.history], [h["train_loss"] for h in single.history], rtol=0, atol=1e-9
        )
        # the exact training NLL of each evaluated state, on the same subsample (issue 21, item 4)
        np.testing.assert_allclose(
            [h["train_nll"] for h in res.history], [h["train_nll"] for h in single.history], rtol=0, atol=1e-9
        )
        for epoch, snap in single_snaps[seed].items():
            for k, v in snap.items():
                torch.testing.assert_close(stacked_snaps[(seed, epoch)][k], v, rtol=0, atol=1e-10)
        for (_, v), (_, v2) in zip(flows[r].state_dict().items(), flow.state_dict().items()):
            torch.testing.assert_close(v, v2, rtol=0, atol=1e-10)  # the restored best state, BN statistics too
    # the seeds really differ (a stack that trained one run twice would pass the above with one seed)
    assert not torch.equal(next(flows[0].parameters()), next(flows[1].parameters()))


def test_stacked_batchnorm_follows_rounding(digits):
    """MAF with batch norm: stacking moves the trajectory no further than a 1e-15 nudge of one weight moves a
    single run, and each run's batch-norm statistics are those of the whole training set."""
    train_x, val_x = digits
    kw = dict(batch_size=40, progress=False, max_epochs=3, patience=5)

    def single(nudge):
        flow = _build("maf", 0, train_x, batch_norm=True)
        with torch.no_grad():
            next(flow.parameters()).mul_(1 + nudge)
        return flow, Trainer(flow, train_x, val_x, lr=3e-3, seed=0, **kw).fit()

    (ref, res_ref), (nudged, res_nudged) = single(0.0), single(1e-15)
    flows = [_build("maf", s, train_x, batch_norm=True) for s in (0, 1)]
    results = StackedTrainer(
        [RunSpec(f, s, 3e-3, patience=5, max_epochs=3) for f, s in zip(flows, (0, 1))],
        train_x,
        val_x,
        batch_size=40,
        progress=False,
    ).fit()
    assert results[0].epochs == res_ref.epochs == 3
    # each run's training NLL is scored with its own whole-training-set batch-norm statistics, as a single run's:
    # off by no more than the nudge moves it (3 epochs of rounding chaos: 5e-6 relative on an AVX2 CPU, less on
    # AVX-512, where a fixed 1e-6 had passed); another run's statistics would be off by orders of magnitude more
    nll = lambda res: np.array([h["train_nll"] for h in res.history])  # noqa: E731
    chaos = np.abs(nll(res_nudged) - nll(res_ref)).max()
    assert 0 < chaos < 1e-3 and np.abs(nll(results[0]) - nll(res_ref)).max() <= 10 * chaos
    for (k, a), b, c in zip(ref.state_dict().items(), flows[0].state_dict().values(), nudged.state_dict().values()):
        assert (a - b).abs().max() <= 10 * (a - c).abs().max() + 1e-10, k
    bn = flows[1].transform.transforms[1]
    with torch.no_grad():
        h = flows[1].transform.transforms[0](train_x)[0]
    torch.testing.assert_close(bn.stat_mean, h.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(bn.stat_var, h.var(0, unbiased=False) + bn.eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "model,hp",
    [
        ("made", dict(hidden=8, hidden_layers=2)),
        ("made-mog", dict(hidden=8)),
        ("maf", dict(layers=3, hidden=8)),
        ("maf-mog", dict(layers=2, hidden=8)),
        ("realnvp", dict(layers=3, hidden=8, hidden_layers=2)),
    ],
)
def test_stacked_modules_equal_vmap_and_single_runs(model, hp):
    """The stacked modules (one call with (R, …) parameters, batch norm on) give each run's own objective and
    gradient: equal to vmap's and to R single-run evaluations, in float64."""
    from flowbench.models.stacking import stacked_train_log_prob, stacks_natively

    R, B, D = 3, 7, 5
    flows = []
    for seed in range(R):
        torch.manual_seed(seed)
        flows.append(models.build_model(model, D, **models.get_spec(model).resolve(hp)).double().train())
    assert stacks_natively(flows[0])
    x = torch.randn(R, B, D, dtype=torch.float64)
    names = [n for n, _ in flows[0].named_parameters()]
    buffers = dict(flows[0].named_buffers())
    out, grads = [], []
    for use_vmap in (False, True):
        params = {
            n: torch.stack([dict(f.named_parameters())[n].detach() for f in flows]).requires_grad_() for n in names
        }
        lp = stacked_train_log_prob(flows[0], params, buffers, x, use_vmap=use_vmap)
        (lp * torch.arange(1.0, B + 1, dtype=torch.float64)).sum().backward()
        out.append(lp.detach())
        grads.append({n: p.grad for n, p in params.items()})
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-12)
    for n in names:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-12, msg=n)
    for r, f in enumerate(flows):
        lp1 = f.train_log_prob(x[r])
        torch.testing.assert_close(out[0][r], lp1.detach(), rtol=0, atol=1e-12)
        (lp1 * torch.arange(1.0, B + 1, dtype=torch.float64)).sum().backward()
        for n, p in f.named_parameters():
            torch.testing.assert_close(grads[0][n][r], p.grad, rtol=0, atol=1e-12, msg=n)


@pytest.mark.parametrize("host_scalars", [("cpu",), ()])
def test_stacked_relgrad_gradient_is_each_runs_relative_gradient(host_scalars, monkeypatch):
    """The batched backward against the single-run RelgradNet in float64, run by run (bias_logdet both ways;
    the CPU path that fuses the log-det term per run and the device path that keeps it on the device)."""
    from flowbench.models import relgrad_autograd
    from flowbench.models.relgrad_autograd import RelgradNet

    # one backward serves both: the stack's runs against the same Function given one run's tensors
    monkeypatch.setattr(relgrad_autograd, "HOST_SCALARS", host_scalars)
    torch.manual_seed(0)
    R, B, D, n = 3, 5, 4, 3
    for act, bias_logdet in (("smooth-leaky-relu", False), ("tanh", True)):
        ws = [torch.randn(R, D, D, dtype=torch.float64, requires_grad=True) for _ in range(n)]
        bs = [torch.randn(R, D, dtype=torch.float64, requires_grad=True) for _ in range(n)]
        x = torch.randn(R, B, D, dtype=torch.float64)
        z, ld = StackedRelgradNet.apply(x, act, 0.3, n, bias_logdet, *ws, *bs)
        c = torch.arange(1.0, R * B + 1, dtype=torch.float64).view(R, B) ** 1.5  # log-det weights differ per run
        ((z**2).sum(-1) * 0.5 - ld * c).sum().backward()
        for r in range(R):
            wr = [w[r].detach().clone().requires_grad_() for w in ws]
            br = [b[r].detach().clone().requires_grad_() for b in bs]
            z1, ld1 = RelgradNet.apply(x[r], act, 0.3, n, bias_logdet, *wr, *br)
            torch.testing.assert_close(z[r], z1, rtol=0, atol=1e-12)
            ((z1**2).sum(-1) * 0.5 - ld1 * c[r]).sum().backward()
            for a, b in zip(ws + bs, wr + br):
                torch.testing.assert_close(a.grad[r], b.grad, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize(
    "model,hp",
    [
        ("maf", dict(layers=3, hidden=8)),
        ("maf-mog", dict(layers=2, hidden=8)),
        ("realnvp", dict(layers=2, hidden=8)),
        ("made", dict(hidden=8)),
    ],
)
def test_stacked_validation_equals_each_runs(model, hp, monkeypatch):
    """Batch-norm statistics from the whole training set and validation log-probs of R runs at once equal
    prepare_for_eval + log_prob run by run (float64; runs in groups and rows in chunks, as for big sets)."""
    from flowbench.models import stacking
    from flowbench.training.evaluate import log_prob_batches

    R, D = 3, 5
    train_x = torch.randn(103, D, dtype=torch.float64) * 2 + 1
    val_x = torch.randn(37, D, dtype=torch.float64)
    flows = []
    for seed in range(R):
        torch.manual_seed(seed)
        flows.append(models.build_model(model, D, **models.get_spec(model).resolve(hp)).double())
    names = [n for n, _ in flows[0].named_parameters()]
    params = {n: torch.stack([dict(f.named_parameters())[n].detach() for f in flows]) for n in names}
    shared = {k: v for k, v in flows[0].named_buffers() if "stat_" not in k}
    monkeypatch.setattr(stacking, "EVAL_GROUP_BYTES", 2 * train_x.numel() * 8)  # groups of 2 runs
    logp, stats = stacking.stacked_validation(
        flows[0], params, shared, train_x, val_x, batch_size=15, stats_batch_size=40
    )
    assert logp.shape == (R, 37)
    for r, f in enumerate(flows):
        f.prepare_for_eval(train_x, batch_size=40)
        np.testing.assert_allclose(logp[r].numpy(), log_prob_batches(f, val_x, 15), rtol=0, atol=1e-11)
        for k, v in stats.items():
            torch.testing.assert_close(v[r], dict(f.named_buffers())[k], rtol=0, atol=1e-12)
    assert len(stats) == 2 * sum(
        isinstance(m, stacking.nn.Module) and hasattr(m, "set_stats_from") for m in flows[0].modules()
    )


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_fused_cpu_adam), False])
def test_stacked_adam_is_each_runs_torch_adam(fused):
    """One stacked Adam step against torch's fused Adam run by run (its default Adam where torch has no fused
    kernel): per-run learning rates and weight decay, unequal step counts (a resumed run), a masked run; with the
    fused kernel and with the fallback algorithm."""
    torch.manual_seed(0)
    flows = [models.build_model("made", 4, hidden=6, hidden_layers=1, activation="relu").double() for _ in range(4)]
    specs = [
        RunSpec(f, s, lr, weight_decay=wd)
        for s, (f, lr, wd) in enumerate(zip(flows, (1e-2, 1e-2, 3e-2, 1e-2), (1e-6, 1e-6, 0.0, 1e-6)))
    ]
    x = torch.randn(20, 4, dtype=torch.float64)
    st = StackedTrainer(specs, x, x, progress=False)
    st._fused = fused and st._fused
    opts = [
        torch.optim.Adam(f.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=FUSED_CPU_ADAM)
        for f, s in zip(flows, specs)
    ]
    live = [True, True, True, False]
    for step in range(3):
        for p in st.params:
            p.grad = torch.randn_like(p)
        if step == 1:
            live[3] = True  # run 3 rejoins one step behind the others: unequal step counts
        for r, (f, opt) in enumerate(zip(flows, opts)):
            if live[r]:
                for p, g in zip(f.parameters(), st.params):
                    p.grad = g.grad[r].clone()
                opt.step()
        st._adam(st.params, st.exp_avg, st.exp_avg_sq, st.steps, st.nsteps, [0, 1, 2, 3], live)
    assert st.nsteps == [3, 3, 3, 2] and st.steps.tolist() == [3.0, 3.0, 3.0, 2.0]
    for r, f in enumerate(flows):
        for k, p in enumerate(f.parameters()):
            torch.testing.assert_close(st.params[k][r], p.detach(), rtol=0, atol=0 if fused else 1e-14)
            torch.testing.assert_close(st.exp_avg_sq[k][r], opts[r].state[p]["exp_avg_sq"], rtol=0, atol=1e-15)


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,5") == [0, 2, 5]
    assert parse_seeds("0-1,7") == [0, 1, 7]
    for bad in ("", "a", "3-1", "1,1", "-2"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_stack_refuses_different_shapes(digits):
    train_x, val_x = digits
    a = models.build_model("maf", 64, layers=1, hidden=8)
    b = models.build_model("maf", 64, layers=1, hidden=9)
    with pytest.raises(ConfigError, match="same model shape"):
        StackedTrainer([RunSpec(a, 0, 1e-3), RunSpec(b, 1, 1e-3)], train_x.float(), val_x.float())


# -- runs and records ------------------------------------------------------------------------------------
from flowbench.data.base import Dataset  # noqa: E402
from flowbench.training import run_experiment  # noqa: E402
from flowbench.training.stacked import run_stacked  # noqa: E402


def toy_data(n_train=600, n_val=150, n_test=300, seed=1) -> Dataset:
    rng = np.random.RandomState(seed)
    x = rng.randn(n_train + n_val + n_test, 3) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]])
    x = x.astype(np.float32)
    return Dataset("toy", x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :])


def run_opts(out, **kw):
    return {
        "out": str(out),
        "model": "maf",
        "layers": 2,
        "hidden": 8,
        "batch_norm": False,
        "batch_size": 50,
        "patience": 2,
        "max_epochs": 8,
        "lr": 1e-2,
        "device": "cpu",
        "checkpoint_every_s": 0,
        **kw,
    }


def numbers(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_stacked_records_match_single_runs(tmp_path):
    data = toy_data()
    # 30 epochs: the seeds stop early, at different epochs (one leaves the stack while the others go on)
    stacked = run_stacked([run_opts(tmp_path / "s", seed=s, max_epochs=30) for s in (0, 1, 2)], data, progress=False)
    assert len({r.epochs for r in stacked}) > 1
    assert all("no improvement" in r.stop_reason and r.best_epoch < r.epochs for r in stacked)
    for seed, rec in zip((0, 1, 2), stacked):
        single = run_experiment(run_opts(tmp_path / "1", seed=seed, max_epochs=30), data, progress=False)
        assert rec.stack == {"seeds": [0, 1, 2], "size": 3, "id": stacked[0].stack["id"]} and single.stack is None
        assert set(rec.to_json()) == set(single.to_json())  # same format
        assert (rec.seed, rec.epochs, rec.best_epoch, rec.stop_reason) == (
            seed,
            single.epochs,
            single.best_epoch,
            single.stop_reason,
        )
        assert {**rec.config, "out": None} == {**single.config, "out": None}  # its own options, seed included
        assert rec.test_ll == pytest.approx(single.test_ll, abs=1e-4)  # float32: rounding only
    assert len({r.test_ll for r in stacked}) == 3


class Kill(Exception):
    pass


def test_stacked_kill_and_resume_equals_uninterrupted(tmp_path):
    data = toy_data()
    seeds = (0, 1)
    full = run_stacked([run_opts(tmp_path / "a", seed=s) for s in seeds], data, progress=False)

    def kill(info):
        if info.epoch == 3 and info.seed == 1:
            raise Kill

    with pytest.raises(Kill):
        run_stacked([run_opts(tmp_path / "b", seed=s) for s in seeds], data, progress=False, callbacks=[kill])
    with pytest.raises(ConfigError, match="different options.*lr"):
        run_stacked([run_opts(tmp_path / "b", seed=s, resume=True, lr=2e-2) for s in seeds], data, progress=False)
    resumed = run_stacked([run_opts(tmp_path / "b", seed=s, resume=True) for s in seeds], data, progress=False)
    for a, b in zip(full, resumed):
        assert any("resumed from the checkpoint after epoch 3" in n for n in b.notes)
        assert numbers(a.history) == numbers(b.history) and a.test_ll == b.test_ll and a.best_epoch == b.best_epoch
    # a stacked run's checkpoint is a single run's: seed 0 resumes alone too
    with pytest.raises(Kill):
        run_stacked([run_opts(tmp_path / "c", seed=s) for s in seeds], data, progress=False, callbacks=[kill])
    alone = run_experiment(run_opts(tmp_path / "c", seed=0, resume=True), data, progress=False)
    assert [h["epoch"] for h in alone.history] == [h["epoch"] for h in full[0].history]
    assert alone.test_ll == pytest.approx(full[0].test_ll, abs=1e-4)


def test_a_stack_resumed_with_a_raised_patience_equals_a_stack_that_had_it(tmp_path):
    """Issue 24 (the 60-epoch relgrad seeds on POWER were resumed so): under patience 1 seed 0 stops at epoch 6,
    under 3 both seeds train to the cap; a stack killed at epoch 3 under 1 and resumed under 3 equals the latter."""
    data = toy_data()
    kw = dict(lr=1e-2, max_epochs=10)
    short = run_stacked([run_opts(tmp_path / "a", seed=s, patience=1, **kw) for s in (0, 1)], data, progress=False)
    full = run_stacked([run_opts(tmp_path / "b", seed=s, patience=3, **kw) for s in (0, 1)], data, progress=False)
    assert short[0].epochs < full[0].epochs

    def kill(info):
        if info.epoch == 3 and info.seed == 1:
            raise Kill

    runs = [run_opts(tmp_path / "c", seed=s, patience=1, **kw) for s in (0, 1)]
    with pytest.raises(Kill):
        run_stacked(runs, data, progress=False, callbacks=[kill])
    resumed = run_stacked([{**o, "patience": 3, "resume": True} for o in runs], data, progress=False)
    for a, b in zip(full, resumed):
        assert numbers(a.history) == numbers(b.history) and a.test_ll == b.test_ll and b.config["patience"] == 3


def test_nan_guard_stops_one_run_the_others_go_on(tmp_path):
    data = toy_data()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)

    def build(seed):
        seed_everything(seed)
        return models.build_model("maf", 3, layers=1, hidden=8, batch_norm=False)

    good, bad, ref = build(0), build(1), build(0)
    with torch.no_grad():
        bad.transform.transforms[0].out.bias.fill_(-1e4)  # log precision −1e4 … fine; +1e4 overflows exp
        bad.transform.transforms[0].out.bias[3:].fill_(1e4)
    res = StackedTrainer(
        [RunSpec(good, 0, 1e-2, max_epochs=3), RunSpec(bad, 1, 1e-2, max_epochs=3)],
        train_x,
        val_x,
        batch_size=50,
        progress=False,
    ).fit()
    single = Trainer(ref, train_x, val_x, lr=1e-2, max_epochs=3, seed=0, batch_size=50, progress=False).fit()
    assert res[1].status == "nonfinite" and "epoch 1, batch 1" in res[1].failure and res[1].best_epoch is None
    assert res[0].status == "ok" and res[0].epochs == 3
    np.testing.assert_allclose([h["val_ll"] for h in res[0].history], [h["val_ll"] for h in single.history], rtol=1e-5)


def test_bench_stack_reports_both_and_ratio():
    from flowbench.bench.stacked import run_stack_bench

    lines: list[str] = []
    res = run_stack_bench(
        "digits", "made", 2, steps=2, batch_size=20, hparams={"hidden": 8}, rounds=1, log=lines.append
    )
    assert set(res["samples_per_s"]) == {"sequential", "stacked"} and res["ratio"] > 0
    assert res["ratio"] == pytest.approx(res["samples_per_s"]["stacked"] / res["samples_per_s"]["sequential"])
    assert "stacked / sequential" in lines[-1]
    with pytest.raises(ConfigError):
        run_stack_bench("digits", "made", 0)


def test_runs_with_dropout_do_not_stack(tmp_path):
    """A stack shares one random stream, so dropout could not give each run its own masks: such runs are
    trained alone by sweeps and refused by --seeds (it was a vmap traceback)."""
    from flowbench.config import coerce_options
    from flowbench.training.stacked import unstackable

    base = {"dataset": "digits", "model": "nsf-ar", "out": str(tmp_path)}
    assert "dropout" in unstackable(coerce_options({**base, "dropout": 0.1}))
    assert unstackable(coerce_options({**base, "dropout": 0.0})) is None
    with pytest.raises(ConfigError, match="dropout"):
        run_stacked([{**base, "dropout": 0.1, "seed": s} for s in (0, 1)], toy_data(), progress=False)


@pytest.mark.parametrize("stacked", [True, False])
def test_n_nonfinite_val_is_the_best_epochs(stacked):
    """The record's count of −inf validation points belongs to the best epoch (the state that is restored and
    tested), not to the last or the first: validation is scripted so the three differ."""
    data = toy_data()
    train_x, val_x = torch.tensor(data.train), torch.tensor(data.val)
    script = {1: (-5.0, 0), 2: (-1.0, 3), 3: (-2.0, 7)}  # epoch → (validation LL, −inf points); best: epoch 2
    flows = [models.build_model("maf", 3, layers=1, hidden=4) for _ in (0, 1)]
    if stacked:
        tr = StackedTrainer(
            [RunSpec(f, s, 1e-3, max_epochs=3) for s, f in enumerate(flows)],
            train_x,
            val_x,
            batch_size=100,
            progress=False,
        )
        tr._validate_all = lambda rows: {i: script[tr.runs[i].epoch + 1] for i in rows}
        results = tr.fit()
    else:
        tr = Trainer(flows[0], train_x, val_x, lr=1e-3, max_epochs=3, batch_size=100, progress=False)
        tr._validate = lambda: script[tr._epoch]
        results = [tr.fit()]
    for res in results:
        assert [h["n_nonfinite_val"] for h in res.history] == [0, 3, 7]
        assert (res.best_epoch, res.best_val_ll, res.n_nonfinite_val) == (2, -1.0, 3)


@pytest.mark.parametrize(
    "model,hp",
    [
        ("maf-cond", dict(layers=3, hidden=8)),
        ("maf-mog-cond", dict(layers=2, hidden=8)),
        ("realnvp-cond", dict(layers=2, hidden=8)),
        ("maf-cond", dict(layers=2, hidden=8, degrees="random")),
    ],
)
def test_stacked_conditional_flows_equal_each_run(model, hp):
    """Class-conditional flows (rows [x, onehot(y)]) in a stack: the objective and its gradient (the stacked
    modules, or vmap where random degrees give each run its own masks) and the stacked validation equal each
    run's own, batch norm on, float64."""
    from flowbench.models import stacking

    R, B, D, K = 3, 7, 4, 3
    flows = []
    for seed in range(R):
        torch.manual_seed(seed)
        flows.append(models.build_model(model, D, classes=K, **hp).double().train())
    shared, per_run = stacking.split_buffers(flows)
    assert stacking.stacks_natively(flows[0]) and bool(per_run) == (hp.get("degrees") == "random")

    def rows(*shape):
        labels = torch.randint(0, K, shape)
        return torch.cat(
            [torch.randn(*shape, D, dtype=torch.float64), torch.nn.functional.one_hot(labels, K).double()], -1
        )

    x = rows(R, B)
    names = [n for n, _ in flows[0].named_parameters()]
    params = {n: torch.stack([dict(f.named_parameters())[n].detach() for f in flows]).requires_grad_() for n in names}
    lp = stacking.stacked_objective(flows[0], shared, run_buffers=per_run)(params, x)
    weights = torch.arange(1.0, B + 1, dtype=torch.float64)
    (lp * weights).sum().backward()
    for r, f in enumerate(flows):
        one = f.train_log_prob(x[r])
        torch.testing.assert_close(lp[r].detach(), one.detach(), rtol=0, atol=1e-12)
        (one * weights).sum().backward()
        for n, p in f.named_parameters():
            torch.testing.assert_close(params[n].grad[r], p.grad, rtol=0, atol=1e-12, msg=n)
    if per_run:  # the trainer validates runs with their own masks one by one
        return
    train_x, val_x = rows(103) * torch.cat([2 * torch.ones(D), torch.ones(K)]), rows(37)
    logp, stats = stacking.stacked_validation(
        flows[0],
        {n: p.detach() for n, p in params.items()},
        {k: v for k, v in shared.items() if "stat_" not in k},
        train_x,
        val_x,
        batch_size=15,
        stats_batch_size=40,
    )
    for r, f in enumerate(flows):
        f.prepare_for_eval(train_x, batch_size=40)
        f.eval()
        torch.testing.assert_close(logp[r], f.log_prob(val_x), rtol=0, atol=1e-11)
        for k, v in stats.items():
            torch.testing.assert_close(v[r], dict(f.named_buffers())[k], rtol=0, atol=1e-12)
