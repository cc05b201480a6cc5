"""flowbench.testing, the public check kit: it passes a correct user model and dataset, and every check fails on
a model (dataset) planted with the bug it exists to catch; ``flowbench check-model`` / ``check-dataset`` exit 0,
1 or 2. The user's code lives in a file written to tmp_path and is named by reference, as a researcher would."""

from __future__ import annotations

import random
import textwrap

import numpy as np
import pytest
import torch

from flowbench.cli import main as cli
from flowbench.testing import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    check_dataset,
    check_model,
    dataset_check_names,
    model_check_names,
    run_model_check,
)

USER_MODELS = textwrap.dedent('''
    """A researcher's flows: one correct, the others each planted with one bug."""
    import math

    import numpy as np
    import torch
    from torch import nn

    from flowbench.models import CompositeTransform, Flow, HParam, ModelSpec, StandardNormal, Transform, check_input


    class Affine(Transform):
        """z = (x − m)·exp(−s)."""

        def __init__(self, dim):
            super().__init__()
            self.m = nn.Parameter(torch.zeros(dim))
            self.s = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            return (x - self.m) * torch.exp(-self.s), (-self.s).sum(-1, keepdim=True).expand(x.shape[:-1])

        def inverse(self, z):
            return z * torch.exp(self.s) + self.m, self.s.sum().expand(z.shape[0])


    class SinhArcsinh(Transform):
        """z = sinh(b·asinh(x) − a), b = exp(log_b): nonlinear, with a closed-form inverse."""

        def __init__(self, dim, offset=0.0, factor=1.0, wrong_inverse=False):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(dim))
            self.log_b = nn.Parameter(torch.zeros(dim))
            self.offset, self.factor, self.wrong_inverse = offset, factor, wrong_inverse

        def _logdet(self, x, u):
            return (torch.log(torch.cosh(u)) + self.log_b - 0.5 * torch.log1p(x ** 2)).sum(-1)

        def forward(self, x):
            u = torch.exp(self.log_b) * torch.asinh(x) - self.a
            return torch.sinh(u), self.factor * self._logdet(x, u) + self.offset

        def inverse(self, z):
            u = torch.asinh(z)
            x = torch.sinh((u + (-self.a if self.wrong_inverse else self.a)) / torch.exp(self.log_b))
            return x, -self._logdet(x, u)


    class Unnormalised(StandardNormal):
        def log_prob(self, z):
            return -0.5 * z.pow(2).sum(-1)  # the −D/2·log 2π is missing


    class WideSampler(StandardNormal):
        def sample(self, n):
            return 1.3 * super().sample(n)  # not the density log_prob describes


    class Float64Base(StandardNormal):
        def log_prob(self, z):
            two_pi = torch.tensor([2 * math.pi], dtype=torch.float64)  # a 1-D float64 tensor promotes float32 input
            return -0.5 * (z.pow(2).sum(-1) + self.dim * torch.log(two_pi))


    class BatchCentred(Transform):
        """Centres each batch on its own mean, in eval mode too."""

        def forward(self, x):
            return x - x.mean(0), x.new_zeros(x.shape[0])

        def inverse(self, z):
            return z, z.new_zeros(z.shape[0])


    class TorchBatchNorm(Transform):
        """torch's BatchNorm1d: eval mode uses running averages, not the whole training set's statistics."""

        def __init__(self, dim):
            super().__init__()
            self.bn = nn.BatchNorm1d(dim, affine=False)

        def forward(self, x):
            var = x.var(0, unbiased=False) if self.training else self.bn.running_var
            return self.bn(x), (-0.5 * torch.log(var + self.bn.eps)).sum().expand(x.shape[0])


    class SubsetBatchNorm(Transform):
        """flowbench's protocol batch norm (set_stats_from), but its statistics come from the first 50 rows only."""

        def __init__(self, dim):
            super().__init__()
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("var", torch.ones(dim))

        def set_stats_from(self, x):
            self.mean, self.var = x[:50].mean(0), x[:50].var(0, unbiased=False)

        def forward(self, x):
            mean, var = (x.mean(0), x.var(0, unbiased=False)) if self.training else (self.mean, self.var)
            return (x - mean) / torch.sqrt(var + 1e-5), (-0.5 * torch.log(var + 1e-5)).sum().expand(x.shape[0])


    class PlainShift(Transform):
        """Keeps the data mean in a plain attribute: not in the state_dict."""

        def __init__(self, dim):
            super().__init__()
            self.shift = torch.zeros(dim)

        def forward(self, x):
            return x - self.shift.to(x), x.new_zeros(x.shape[0])

        def inverse(self, z):
            return z + self.shift.to(z), z.new_zeros(z.shape[0])


    class ShiftFlow(Flow):
        def initialize(self, train_x):
            self.transform.transforms[0].shift = train_x.mean(0)


    class Unchecked(Flow):
        def log_prob(self, x):  # no check_input
            return self._log_prob(x)


    class NanFar(Flow):
        def log_prob(self, x):
            check_input(x, self.dim)
            lp = self._log_prob(x)
            return torch.where(x.abs().amax(-1) > 100, torch.full_like(lp, float("nan")), lp)


    class StacksWrongly(Affine):
        """Claims to evaluate stacked parameters (stacks = True), but sums the log-det over every run."""

        stacks = True

        def forward(self, x):
            return (x - self.m.unsqueeze(-2)) * torch.exp(-self.s.unsqueeze(-2)), (-self.s).sum().expand(x.shape[:-1])


    class ReadsItem(Affine):
        """Reads a parameter's value on the host (.item()): fine alone, impossible under vmap."""

        def forward(self, x):
            z, logdet = super().forward(x)
            return z * (1.0 + 0.0 * self.s.sum().item()), logdet


    HP = {"layers": HParam(1, "sinh-arcsinh layers", low=1)}


    def good(dim, layers=1, offset=0.0, factor=1.0, wrong_inverse=False, base=StandardNormal, flow=Flow):
        steps = [Affine(dim)] + [SinhArcsinh(dim, offset, factor, wrong_inverse) for _ in range(layers)]
        return flow(CompositeTransform(steps), base(dim), dim)


    def spec(name, build, label="Kit ({layers})", **kw):
        return ModelSpec(name=name, build=build, hparams=HP, label=label, paper="a test", lr=1e-3, **kw)


    def unused(dim, layers=1):
        f = good(dim, layers)
        f.spare = nn.Parameter(torch.zeros(dim))  # never used by the loss
        return f


    def unseeded(dim, layers=1):
        f = good(dim, layers)
        with torch.no_grad():  # numpy's new-style generator is not reached by np.random.seed
            f.transform.transforms[0].m.copy_(torch.as_tensor(np.random.default_rng().normal(size=dim)))
        return f


    def broken(dim, layers=1):
        raise RuntimeError("forgot to finish this")


    GOOD = spec("kit-good", good)
    LOGDET_OFFSET = spec("kit-offset", lambda dim, layers=1: good(dim, layers, offset=0.5))
    LOGDET_FACTOR = spec("kit-factor", lambda dim, layers=1: good(dim, layers, factor=2.0))
    UNNORMALISED = spec("kit-unnormalised", lambda dim, layers=1: good(dim, layers, base=Unnormalised))
    WRONG_SAMPLER = spec("kit-sampler", lambda dim, layers=1: good(dim, layers, base=WideSampler))
    WRONG_INVERSE = spec("kit-inverse", lambda dim, layers=1: good(dim, layers, wrong_inverse=True))
    UNUSED_PARAMETER = spec("kit-unused", unused)
    BATCH_DEPENDENT = spec("kit-batch", lambda dim, layers=1: Flow(CompositeTransform([Affine(dim), BatchCentred()]),
                                                                   StandardNormal(dim), dim))
    TORCH_BATCHNORM = spec("kit-bn", lambda dim, layers=1: Flow(CompositeTransform([Affine(dim), TorchBatchNorm(dim)]),
                                                                StandardNormal(dim), dim))
    SUBSET_BATCHNORM = spec("kit-subset-bn", lambda dim, layers=1: Flow(
        CompositeTransform([Affine(dim), SubsetBatchNorm(dim)]), StandardNormal(dim), dim))
    NOT_A_BUFFER = spec("kit-plain", lambda dim, layers=1: ShiftFlow(CompositeTransform([PlainShift(dim), Affine(dim)]),
                                                                     StandardNormal(dim), dim))
    FLOAT64_ONLY = spec("kit-float64", lambda dim, layers=1: good(dim, layers, base=Float64Base))
    UNSEEDED = spec("kit-unseeded", unseeded)
    UNCHECKED_INPUT = spec("kit-unchecked", lambda dim, layers=1: good(dim, layers, flow=Unchecked))
    NAN_FAR = spec("kit-nan", lambda dim, layers=1: good(dim, layers, flow=NanFar))
    NO_LABEL = spec("kit-nolabel", good, label=" ")
    STACKS_WRONGLY = spec("kit-stacks", lambda dim, layers=1: Flow(CompositeTransform([StacksWrongly(dim)]),
                                                                   StandardNormal(dim), dim))
    READS_ITEM = spec("kit-item", lambda dim, layers=1: Flow(CompositeTransform([ReadsItem(dim)]), StandardNormal(dim),
                                                             dim))
    BROKEN = spec("kit-broken", broken)
''')

#: attribute of USER_MODELS → the checks its planted bug must fail.
PLANTED = {
    "LOGDET_OFFSET": ["log-det", "normalisation"],
    "LOGDET_FACTOR": ["log-det", "normalisation"],
    "UNNORMALISED": ["normalisation"],
    "WRONG_SAMPLER": ["samples-match-density"],
    "WRONG_INVERSE": ["inverse"],
    "UNUSED_PARAMETER": ["gradients"],
    "BATCH_DEPENDENT": ["batch-independence"],
    "SUBSET_BATCHNORM": ["batchnorm-eval-stats"],
    "NOT_A_BUFFER": ["save-load"],
    "FLOAT64_ONLY": ["float32"],
    "UNSEEDED": ["determinism"],
    "UNCHECKED_INPUT": ["bad-input"],
    "NAN_FAR": ["far-from-data"],
    "NO_LABEL": ["label"],
    "STACKS_WRONGLY": ["stacking"],
    "BROKEN": ["build"],
}


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "my_flows.py"
    path.write_text(USER_MODELS)
    return path


def test_a_correct_user_model_passes_every_check(user_file):
    report = check_model(f"{user_file}:GOOD")
    assert report.ok, str(report)
    allowed_skips = {"batchnorm-eval-stats", "conditional"} | ({"cuda"} if not torch.cuda.is_available() else set())
    assert {r.name for r in report.results if r.status != PASS} == allowed_skips, str(report)
    assert [r.name for r in report.results] == model_check_names()
    assert "torch.func.vmap" in report["stacking"].detail  # a user's modules stack through vmap
    report.raise_for_failures()  # nothing to raise


def test_a_correct_user_model_passes_in_one_and_two_dimensions(user_file):
    for dim in (1, 2):
        report = check_model(
            f"{user_file}:GOOD",
            dim=dim,
            hparams={"layers": 2},
            checks=["log-det", "normalisation", "samples-match-density", "inverse"],
        )
        assert report.ok and "grid" in report["normalisation"].detail, str(report)


@pytest.mark.parametrize("attr", list(PLANTED))
def test_every_check_catches_its_planted_bug(attr, user_file):
    checks = PLANTED[attr]
    report = check_model(f"{user_file}:{attr}", checks=checks)
    assert not report.ok
    for name in checks:
        assert report[name].status == FAIL, str(report)
    with pytest.raises(AssertionError, match=checks[0]):
        report.raise_for_failures()
    # the same check passes on the correct model: the failure is the bug's, not the check's
    assert check_model(f"{user_file}:GOOD", checks=checks).ok


def test_torch_batch_norm_is_a_warning(user_file):
    """A peer's (or a user's) torch BatchNorm keeps running averages; flowbench documents that it leaves them
    alone, so the kit warns that this is not the MAF protocol's whole-training-set statistics."""
    report = check_model(f"{user_file}:TORCH_BATCHNORM", checks=["batchnorm-eval-stats"])
    res = report["batchnorm-eval-stats"]
    assert res.status == WARN and report.ok and "running averages" in res.detail and res.figure > 0.1


def test_figures_name_the_size_of_the_bug(user_file):
    offset = check_model(f"{user_file}:LOGDET_OFFSET", checks=["log-det", "normalisation"])
    assert offset["log-det"].figure == pytest.approx(0.5, abs=1e-9)  # the planted constant, row by row
    assert offset["normalisation"].figure == pytest.approx(np.exp(0.5), rel=0.03)
    unnormalised = check_model(f"{user_file}:UNNORMALISED", checks=["log-det", "normalisation"])
    assert unnormalised["log-det"].status == PASS  # the transform is right; the base density is not
    assert unnormalised["normalisation"].figure == pytest.approx((2 * np.pi) ** 1.5, rel=0.03)
    flat = check_model(f"{user_file}:UNNORMALISED", dim=2, checks=["normalisation"])
    assert flat["normalisation"].figure == pytest.approx(2 * np.pi, rel=0.01)  # the grid, in 2-D


def test_a_build_failure_skips_the_rest(user_file):
    report = check_model(f"{user_file}:BROKEN")
    assert report["build"].status == FAIL and "forgot to finish this" in report["build"].detail
    assert {r.status for r in report.results[1:]} == {SKIP}
    assert report.results[0].name == "build"


def test_a_wrong_stacked_module_path_is_a_failure_not_a_skip(user_file):
    """Stacked modules (stacks = True) are flowbench's own path: wrong values there are the model's bug; only a
    model that vmap cannot evaluate is skipped (flowbench then runs its seeds one at a time)."""
    res = check_model(f"{user_file}:STACKS_WRONGLY", checks=["stacking"])["stacking"]
    assert res.status == FAIL and "stacked modules" in res.detail, res


def test_a_model_vmap_cannot_evaluate_is_skipped_with_the_reason(user_file):
    res = check_model(f"{user_file}:READS_ITEM", checks=["stacking"])["stacking"]
    assert res.status == SKIP and "runs one at a time" in res.detail and "item" in res.detail


@pytest.mark.parametrize("check", model_check_names())
def test_the_pytest_helper_as_a_user_writes_it(check, user_file):
    """The module docstring's example: one test per check, skips reported as skips."""
    run_model_check(f"{user_file}:GOOD", check)


def test_the_pytest_helper_fails_and_skips(user_file):
    with pytest.raises(AssertionError, match="log-det"):
        run_model_check(f"{user_file}:LOGDET_FACTOR", "log-det")
    with pytest.raises(pytest.skip.Exception, match="no batch norm"):
        run_model_check(f"{user_file}:GOOD", "batchnorm-eval-stats")


def test_the_kit_leaves_the_callers_random_streams_alone(user_file):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    want = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    check_model(f"{user_file}:GOOD", checks=["determinism", "samples-match-density"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == want


def test_unknown_checks_and_bad_hyperparameters_are_config_errors(user_file):
    from flowbench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model check"):
        check_model("maf", checks=["no-such-check"])
    with pytest.raises(ConfigError, match="does not accept hyperparameter"):
        check_model(f"{user_file}:GOOD", hparams={"width": 3})


# -- the CLI -------------------------------------------------------------------------------------------------
def test_check_model_cli_exit_codes_and_table(user_file, capsys):
    assert cli(["check-model", f"{user_file}:GOOD", "--layers", "2", "--seed", "1"]) == 0  # run's spelling
    out = capsys.readouterr().out
    assert "layers=2" in out and "seed 1" in out
    for name in model_check_names():
        assert name in out
    assert "max |Δ|" in out and "∫p = " in out and "0 failed" in out

    assert cli(["check-model", f"{user_file}:LOGDET_OFFSET", "--check", "log-det", "--check", "label"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "1 passed, 1 failed" in out and "max |Δ| 0.5" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check-model", "no-such-model"], "unknown model 'no-such-model'"),
        (["check-model", "missing_flows.py:SPEC"], "no such file"),
        (["check-model", "maf", "--activation", "sigmoid"], "--activation 'sigmoid' is not allowed; choose one of"),
        (["check-model", "maf", "--components", "3"], "does not accept hyperparameter(s) components"),
        (["check-model", "maf", "--check", "nope"], "unknown model check"),
        (["check-dataset", "no_such_data"], "unknown dataset 'no_such_data'"),
    ],
)
def test_bad_references_exit_2_with_a_message(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_check_model_cli_on_a_registered_model(capsys):
    assert cli(["check-model", "maf", "--check", "log-det", "--check", "stacking"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("model maf, dim 3, seed 0") and "stacked modules" in out


def test_check_lists(capsys):
    assert cli(["check-model", "maf", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in model_check_names())
    assert cli(["check-dataset", "digits", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in dataset_check_names())


# -- datasets --------------------------------------------------------------------------------------------------
USER_DATA = textwrap.dedent('''
    """A researcher's tables: one correct, the others each planted with one bug."""
    import numpy as np

    from flowbench.data import DatasetSpec, maf_split


    def _table(root):
        return np.load(root / "kit_table" / "data.npy")


    def good(root):
        return maf_split(_table(root), seed=1)


    def unseeded(root):
        return maf_split(_table(root), seed=int(np.random.default_rng().integers(1 << 30)))


    def with_nan(root):
        s = good(root)
        s["val"][0, 1] = np.nan
        return s


    def ragged(root):
        s = good(root)
        s["test"] = s["test"][:, :2]
        return s


    def leaky(root):
        s = good(root)
        s["test"] = np.vstack([s["test"], s["train"][:3]])
        return s


    def spec(name, prepare, sizes=(162, 18, 20), raw=("kit_table/data.npy",)):
        return DatasetSpec(name=name, dim=3, sizes=sizes, raw_files=raw, source="my lab", description="a table",
                           recipe_version=1, prepare=prepare)


    GOOD = spec("kit_good", good)
    UNSEEDED = spec("kit_unseeded", unseeded)
    NAN = spec("kit_nan", with_nan)
    RAGGED = spec("kit_ragged", ragged)
    LEAKY = spec("kit_leaky", leaky, sizes=(162, 18, 23))
    WRONG_SIZES = spec("kit_sizes", good, sizes=(100, 50, 50))
    MISSING = spec("kit_missing", good, raw=("kit_other/data.npy",))
''')


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("userdata")
    (base / "my_data.py").write_text(USER_DATA)
    root = base / "root"
    (root / "kit_table").mkdir(parents=True)
    np.save(root / "kit_table" / "data.npy", np.random.RandomState(0).randn(200, 3) @ np.diag([1.0, 2.0, 0.5]))
    return base / "my_data.py", root


def test_a_correct_user_dataset_passes_and_is_cached(data_files):
    module, root = data_files
    report = check_dataset(f"{module}:GOOD", root)
    assert report.ok and {r.status for r in report.results} == {PASS}, str(report)
    assert [r.name for r in report.results] == dataset_check_names()
    assert (root / "processed" / "kit_good" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "attr, check, status",
    [
        ("UNSEEDED", "deterministic", FAIL),
        ("NAN", "finite", FAIL),
        ("NAN", "load", FAIL),  # the loader refuses NaN with a DataIntegrityError
        ("RAGGED", "width", FAIL),
        ("WRONG_SIZES", "sizes", FAIL),
        ("MISSING", "raw-files", FAIL),
        ("LEAKY", "overlap", WARN),
    ],
)
def test_every_dataset_check_catches_its_planted_bug(attr, check, status, data_files):
    module, root = data_files
    report = check_dataset(f"{module}:{attr}", root)
    assert report[check].status == status, str(report)
    assert report.ok is (status != FAIL)
    if attr == "LEAKY":
        assert report[check].figure == 3 and "train∩test 3" in report[check].detail
    if attr == "MISSING":
        assert "kit_other/data.npy" in report[check].detail and report["prepare"].status == SKIP


def test_a_dataset_spec_object_is_checked_and_unregistered_after(data_files):
    from flowbench.data import DATASETS, DatasetSpec

    module, root = data_files
    ns: dict = {}
    exec(compile(module.read_text(), str(module), "exec"), ns)
    spec = ns["GOOD"]
    spec = DatasetSpec(**{**spec.__dict__, "name": "kit_object"})
    report = check_dataset(spec, root, checks=["load"])
    assert report.ok, str(report)
    assert "kit_object" not in DATASETS


def test_check_dataset_cli_exit_codes(data_files, capsys):
    module, root = data_files
    assert cli(["check-dataset", f"{module}:GOOD", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dataset kit_good, D 3") and "0 failed" in out
    assert cli(["check-dataset", f"{module}:NAN", "--root", str(root)]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert cli(["check-dataset", f"{module}:NOPE", "--root", str(root)]) == 2
    assert "has no attribute 'NOPE'" in capsys.readouterr().err


def test_a_finite_value_never_matches_an_infinite_reference():
    from flowbench.testing import _deviation

    inf = float("inf")
    assert not _deviation(torch.tensor([0.0, 1.0]), torch.tensor([-inf, 1.0]), 1e-9, 1e-9)[2]
    assert not _deviation(torch.tensor([-inf, 1.0]), torch.tensor([0.0, 1.0]), 1e-9, 1e-9)[2]
    assert _deviation(torch.tensor([-inf, 1.0]), torch.tensor([-inf, 1.0]), 1e-9, 1e-9)[2]
