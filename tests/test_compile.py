"""``--compile``: the training objective through ``torch.compile``, for single runs and stacks.

The compiled step must be the eager step up to the rounding of fused kernels, and it must really be compiled
(dynamo's graph counter moves). Small float64 flows on toy data; each test compiles a few graphs (seconds each).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import flowbench.models as models
from flowbench.config import resolve_options
from flowbench.data.base import Dataset
from flowbench.sweep.spec import make_tag
from flowbench.training.stacked import RunSpec, StackedTrainer, run_stacked, stack_key
from flowbench.training.trainer import Trainer, compile_problem
from flowbench.utils import seed_everything

pytestmark = [
    pytest.mark.slow,
    # torch's inductor imports torch.utils.mkldnn, which warns about its own use of torch.jit
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

HP = dict(layers=2, hidden=8, batch_norm=False)


@pytest.fixture(scope="module")
def toy():
    rng = np.random.RandomState(3)
    x = rng.randn(700, 3) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]])
    return torch.tensor(x[:500]), torch.tensor(x[500:])  # 500 rows in batches of 50: no short last batch


def _flow(seed: int, train_x: torch.Tensor):
    seed_everything(seed)
    flow = models.build_model("maf", 3, **HP).double()
    flow.initialize(train_x)
    return flow


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_single_run_follows_the_eager_one(toy):
    train_x, val_x = toy
    kw = dict(lr=1e-2, batch_size=50, max_epochs=3, seed=0, progress=False)
    eager = Trainer(_flow(0, train_x), train_x, val_x, **kw).fit()
    before = _graphs()
    compiled = Trainer(_flow(0, train_x), train_x, val_x, compile=True, **kw).fit()
    assert _graphs() > before  # the compiled path was taken
    assert compiled.epochs == eager.epochs == 3
    np.testing.assert_allclose(
        [h["val_ll"] for h in compiled.history], [h["val_ll"] for h in eager.history], rtol=1e-7, atol=1e-7
    )


def test_compiled_stack_follows_the_eager_stack_as_runs_leave_it(toy):
    """Seed 0 stops after 2 epochs, seed 1 trains on alone: the stack's objective for the remaining row is
    compiled once more, and both runs follow the eager stack's."""
    train_x, val_x = toy

    def fit(compile: bool):
        specs = [RunSpec(_flow(s, train_x), s, 1e-2, max_epochs=m) for s, m in ((0, 2), (1, 4))]
        st = StackedTrainer(specs, train_x, val_x, batch_size=50, progress=False, compile=compile)
        return st.fit(), st

    eager, _ = fit(False)
    before = _graphs()
    compiled, st = fit(True)
    assert _graphs() >= before + 2  # the whole stack's graph, then seed 1's alone
    assert sorted(st._objectives) == [(0, 1), (1,)]
    for a, b in zip(compiled, eager):
        assert a.epochs == b.epochs
        np.testing.assert_allclose([h["val_ll"] for h in a.history], [h["val_ll"] for h in b.history], rtol=1e-7)
    assert [r.epochs for r in compiled] == [2, 4]


def test_seeds_with_compile_train_as_one_compiled_stack(tmp_path):
    """``run --seeds 0-1 --compile`` trains a stack (it used to be refused); runs that differ in ``compile``
    never share one."""
    rng = np.random.RandomState(1)
    x = rng.randn(450, 3).astype(np.float32)
    data = Dataset("toy", x[:300], x[300:375], x[375:])
    opts = {"out": str(tmp_path), "model": "maf", **HP, "batch_size": 50, "max_epochs": 2, "device": "cpu"}
    before = _graphs()
    recs = run_stacked([{**opts, "seed": s, "compile": True} for s in (0, 1)], data, progress=False)
    assert _graphs() > before
    assert [r.stack["size"] for r in recs] == [2, 2] and all(r.config["compile"] for r in recs)
    with_, without = (resolve_options({"dataset": "power", "model": "maf", "compile": c}) for c in (True, False))
    assert stack_key(with_) != stack_key(without)
    assert stack_key(with_) == stack_key(with_.replace(seed=5))
    # nor does it name a sweep's run: a stopped sweep resumes the same runs compiled (or not)
    assert make_tag([("compile", True), ("hidden_layers", 2)]) == make_tag([("hidden_layers", 2)]) == "hidden-layers=2"


def test_compile_without_a_cpp_compiler_is_refused_before_training(tmp_path, capsys):
    """On a CPU, torch.compile builds C++ kernels: without a compiler the first step failed with a traceback deep
    in inductor; now the run is refused up front, exit 2, and nothing is trained or written."""
    import torch._inductor.config as inductor_config

    from flowbench.cli import main as cli_main

    # inductor's own patch: monkeypatch's undo deleted the setting, which broke every later compile
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        argv = ["run", "--dataset", "digits", "--model", "made", "--max-epochs", "1", "--device", "cpu"]
        assert cli_main([*argv, "--compile", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "--compile on the CPU needs a C++ compiler" in err and "run without --compile" in err
        assert "Traceback" not in err and not list((tmp_path / "out").rglob("*.json"))
        bench = ["bench", "train", "--dataset", "power", "--model", "maf", "--steps", "2", "--device", "cpu"]
        assert cli_main([*bench, "--compile", "--out", str(tmp_path / "bench")]) == 2
        assert "needs a C++ compiler" in capsys.readouterr().err and not (tmp_path / "bench").exists()
        # the closed-form Gaussian compiles nothing, so it is not refused
        assert cli_main(["run", "--dataset", "digits", "--model", "gaussian", "--compile", "--out", str(tmp_path)]) == 0
    assert compile_problem(torch.device("cpu")) is None  # the setting is back for the tests after this one


def test_every_trainer_compiles_past_dynamos_per_code_limit(toy, monkeypatch):
    """dynamo keeps at most ``recompile_limit`` graphs per code object and process, then runs eagerly with only a
    warning; the trainers' objectives used to share one code object, so a process's ninth model shape (a sweep,
    the column benchmark) trained eagerly. Ten shapes, each trainer's objective compiled (by dynamo: the limit is
    dynamo's, so the test skips inductor's code generation)."""
    train_x, val_x = toy
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    config = torch._dynamo.config
    limit = config.recompile_limit if hasattr(config, "recompile_limit") else config.cache_size_limit  # older torch
    for hidden in range(4, 4 + limit + 2):
        seed_everything(0)
        flow = models.build_model("made", 3, hidden=hidden).double()
        tr = Trainer(flow, train_x, val_x, lr=1e-3, batch_size=50, progress=False, compile=True)
        before = _graphs()
        tr._objective(train_x[:50])
        assert _graphs() == before + 1, f"hidden={hidden}: not compiled (eager fallback)"


class _Kill(Exception):
    pass


def test_an_eager_stack_resumed_compiled_follows_the_uninterrupted_one(tmp_path):
    """`compile` may change at a resume (the POWER anchors did: eager for 4 epochs, compiled after): a stack killed
    after epoch 2 and resumed with compile gives the uninterrupted eager stack's numbers up to rounding."""
    rng = np.random.RandomState(2)
    x = rng.randn(450, 3).astype(np.float64)
    data = Dataset("toy", x[:300], x[300:375], x[375:])
    opts = {**HP, "model": "maf", "batch_size": 50, "max_epochs": 4, "lr": 1e-2, "device": "cpu"}
    opts["checkpoint_every_s"] = 0
    full = run_stacked([{**opts, "out": str(tmp_path / "a"), "seed": s} for s in (0, 1)], data, progress=False)

    def kill(info):
        if info.epoch == 2 and info.seed == 1:
            raise _Kill

    runs = [{**opts, "out": str(tmp_path / "b"), "seed": s} for s in (0, 1)]
    with pytest.raises(_Kill):
        run_stacked(runs, data, progress=False, callbacks=[kill])
    before = _graphs()
    resumed = run_stacked([{**o, "resume": True, "compile": True} for o in runs], data, progress=False)
    assert _graphs() > before
    for a, b in zip(full, resumed):
        assert any("resumed from the checkpoint after epoch 2" in n for n in b.notes) and b.config["compile"]
        assert [h["epoch"] for h in a.history] == [h["epoch"] for h in b.history] == [1, 2, 3, 4]
        np.testing.assert_allclose([h["val_ll"] for h in b.history], [h["val_ll"] for h in a.history], rtol=1e-5)
        assert b.test_ll == pytest.approx(a.test_ll, abs=1e-4)
