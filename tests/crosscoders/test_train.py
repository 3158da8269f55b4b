"""Training loop: exact resume after a crash, clear errors on bad batches, schedules, evaluate."""

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from crosscoders import activations as A
from crosscoders import sparse as S
from crosscoders.config import CrosscoderConfig, TrainConfig
from crosscoders.dataclass_cli import replace
from crosscoders.evaluation import evaluate
from crosscoders.io import read_jsonl
from crosscoders.model import Crosscoder
from crosscoders.synthetic import PlantedFeatures, SyntheticConfig
from crosscoders.train import lr_factor, sparsity_factor, train

TRUTH = PlantedFeatures(SyntheticConfig(n_sources=3, d_in=8, n_features=12, seed=3))


def cfg(activation="batchtopk", steps=24, **kw):
    cc = CrosscoderConfig(n_sources=3, d_in=8, d_sae=24, activation=activation, k=2.0)
    base = dict(crosscoder=cc, steps=steps, lr=3e-3, sparsity_coef=0.5, dead_tokens=64 * 4, log_every=4,
                checkpoint_every=8, progress=False)
    return TrainConfig(**{**base, **kw})


class Crash(RuntimeError):
    pass


def crashing(source, at_step):
    """A batch source that dies (like a killed process) when asked for the batch of `at_step`."""
    def batches(start):
        for i, x in enumerate(source(start), start):
            if i == at_step:
                raise Crash(f"killed at {i}")
            yield x
    return batches


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_resume_after_crash_ends_in_the_same_weights(tmp_path, activation):
    c = cfg(activation)
    src = TRUTH.batch_source(64)
    ref = train(c, src, tmp_path / "ref")
    with pytest.raises(Crash):
        train(c, crashing(src, 19), tmp_path / "run")  # last checkpoint at step 16, steps 17-19 lost
    assert torch.load(tmp_path / "run/checkpoint/state.pt", weights_only=True)["step"] == 16
    resumed = train(c, src, tmp_path / "run")
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    steps = [r["step"] for r in read_jsonl(tmp_path / "run/train_log.jsonl")]
    assert steps == sorted(set(steps)) == [4, 8, 12, 16, 20, 24]  # rows after the checkpoint were redone once


def test_resume_with_a_replayable_iterable(tmp_path):
    c = cfg(steps=16)
    data = [TRUTH.batch(i, 64) for i in range(16)]
    ref = train(c, data, tmp_path / "ref")
    with pytest.raises(Crash):
        train(c, crashing(lambda s: iter(data[s:]), 12), tmp_path / "run")
    resumed = train(c, data, tmp_path / "run")  # a list: the trainer skips the 8 consumed batches
    assert torch.equal(ref.W_dec, resumed.W_dec)


def test_resume_refuses_a_different_config(tmp_path):
    train(cfg(steps=8), TRUTH.batch_source(64), tmp_path)
    with pytest.raises(ValueError, match=r"different config.*lr"):
        train(cfg(steps=8, lr=1e-2), TRUTH.batch_source(64), tmp_path)


def test_nan_batch_names_the_step(tmp_path):
    def src(start):
        for i in range(start, 100):
            x = TRUTH.batch(i, 32)
            if i == 5:
                x[3, 1, 2] = float("nan")
            yield x
    with pytest.raises(ValueError, match="step 5 .*non-finite"):
        train(cfg(), src, tmp_path)


def test_wrong_shape_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"step 0.*n_sources=3, d_in=8.*\[16, 2, 8\]"):
        train(cfg(), [torch.randn(16, 2, 8)], tmp_path)


def test_shapes_taken_from_the_data_and_norm_scale_folded(tmp_path):
    c = replace(cfg(steps=60), crosscoder={"d_sae": 24, "activation": "relu"})
    scale = TRUTH.norm_scale()
    model = train(c, TRUTH.batch_source(128, scale), tmp_path, norm_scale=scale,
                  eval_batch=TRUTH.batch(999, 256, scale))
    assert (model.cfg.n_sources, model.cfg.d_in) == (3, 8)
    loaded = Crosscoder.load(tmp_path)
    raw = TRUTH.batch(1000, 512)
    ev_raw = evaluate(loaded, [raw])
    ev_norm = evaluate(loaded.fold_norm_scale(1 / scale), [raw * scale[:, None]])  # unfold again
    assert ev_raw["fvu"] == pytest.approx(ev_norm["fvu"], rel=1e-4)
    assert ev_raw["fvu_mean"] < 0.5  # it learned something in 60 steps
    log = read_jsonl(tmp_path / "train_log.jsonl")
    assert log[-1]["final"] and len(log[-1]["eval"]["fvu"]) == 3
    assert {"fvu", "l0", "dead_frac", "lr", "mse"} <= set(log[0])
    assert json.loads((tmp_path / "train_config.json").read_text())["crosscoder"]["n_sources"] == 3


def test_bf16_autocast_trains(tmp_path):
    c = cfg(steps=40, autocast="bf16", log_every=1)
    train(c, TRUTH.batch_source(64), tmp_path)
    mse = [r["mse"] for r in read_jsonl(tmp_path / "train_log.jsonl")]
    assert all(map(lambda v: v == v, mse)) and sum(mse[-5:]) < 0.5 * sum(mse[:5])


def test_schedules():
    c = TrainConfig(steps=100, lr_warmup_frac=0.1, lr_decay_start_frac=0.8, sparsity_warmup_frac=0.2)
    assert lr_factor(c, 0) == pytest.approx(0.1) and lr_factor(c, 9) == 1.0 and lr_factor(c, 50) == 1.0
    assert lr_factor(c, 90) == pytest.approx(0.5) and lr_factor(c, 100) == pytest.approx(0.0)
    cos = replace(c, lr_decay="cosine", min_lr_frac=0.1)
    assert lr_factor(cos, 90) == pytest.approx(0.55) and lr_factor(cos, 100) == pytest.approx(0.1)
    assert sparsity_factor(c, 9) == pytest.approx(0.5) and sparsity_factor(c, 20) == 1.0


def test_evaluate_against_definitions():
    m = Crosscoder(CrosscoderConfig(n_sources=2, d_in=4, d_sae=6, activation="relu")).eval()
    x = torch.randn(100, 2, 4) + 3
    with torch.no_grad():
        m.W_dec.zero_()
        m.b_dec.copy_(x.mean(0))  # predicts the mean: FVU = 1 by definition
        m.b_enc.copy_(torch.tensor([1.0, 1.0, -100, -100, -100, -100]))
        m.W_enc.zero_()
    ev = evaluate(m, [x[:50], x[50:]])
    assert ev["fvu"] == pytest.approx([1.0, 1.0], rel=1e-6)
    assert ev["l0"] == 2.0 and ev["dead_frac"] == pytest.approx(4 / 6) and ev["n_tokens"] == 100


def test_cli_trains_from_an_activation_store(tmp_path):
    store = pytest.importorskip("crosscoders.store_writer")
    from crosscoders.train import main

    w = store.StoreWriter(tmp_path / "acts", sources=["step0", "step1", "step2"], hook="blocks.0.hook_resid_post",
                          d_in=8, dtype="float32")
    for i in range(4):
        w.add(TRUTH.batch(i, 256), torch.arange(256))
    w.finish()
    model = main(["--store", str(tmp_path / "acts"), "--out", str(tmp_path / "cc"), "--steps", "30",
                  "--batch-size", "64", "--lr", "3e-3", "--d-sae", "24", "--activation", "relu",
                  "--progress", "false", "--eval-tokens", "128"])
    assert (model.cfg.n_sources, model.cfg.d_in, model.cfg.d_sae) == (3, 8, 24)
    loaded = Crosscoder.load(tmp_path / "cc")
    assert evaluate(loaded, [TRUTH.batch(77, 512)])["fvu_mean"] < 0.8  # works on raw activations
    # a second run resumes from the finished checkpoint and gives the same weights
    again = main(["--store", str(tmp_path / "acts"), "--out", str(tmp_path / "cc"), "--steps", "30",
                  "--batch-size", "64", "--lr", "3e-3", "--d-sae", "24", "--activation", "relu",
                  "--progress", "false"])
    assert torch.equal(again.W_dec, loaded.W_dec)


def test_training_many_epochs_over_the_store_warns(tmp_path):
    from crosscoders.store_writer import StoreWriter
    from crosscoders.train import check_epochs, main

    assert check_epochs(TrainConfig(steps=10, batch_size=100), 1000) == 1.0  # 1 epoch: silent
    with pytest.warns(UserWarning, match=r"12,800 tokens = 200.0 epochs over the 64 tokens stored"):
        check_epochs(TrainConfig(steps=100, batch_size=128), 64)
    # and through the CLI that trains on a store (the pipeline's crosscoder stage calls the same check)
    store = tmp_path / "store"
    w = StoreWriter(store, ["a", "b"], "blocks.0.hook_resid_post", 8, dtype="float32")
    w.add(torch.randn(64, 2, 8), torch.zeros(64, dtype=torch.long), torch.arange(64))
    w.finish()
    with pytest.warns(UserWarning, match="epochs over the 64 tokens stored"):
        main(["--store", str(store), "--out", str(tmp_path / "o"), "--steps", "3", "--batch-size", "128",
              "--d-sae", "16", "--progress", "false"])


def test_ge2025_recipe_is_theirs_and_does_not_cycle_the_store():
    import warnings

    from crosscoders.train import check_epochs
    from evolution.recipe import load_recipe

    r = load_recipe("runs/pythia-160m-ge2025.toml")
    cc = r.train.crosscoder
    assert (cc.activation, cc.gate, r.train.sparsity, r.harvest.hook) == \
        ("jumprelu", "per_source", "tanh_quad", "blocks.6.hook_resid_post")
    assert (cc.d_sae, r.train.lr, r.train.sparsity_coef, r.train.batch_size) == (32 * 768, 5e-5, 0.3, 2048)
    assert len(r.snapshots.steps) == 32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_epochs(r.train, r.harvest.n_seqs * r.corpus.seq_len) <= 4


class HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for a CUDA device: a scalar read (`.item()`, `bool(t)`, `int(t)`),
    `nonzero` and boolean-mask indexing (their output size is data-dependent), and copies to the CPU. On the
    CPU nothing waits, so they are counted here to show what a GPU run would stall on."""

    SIZE_DEPENDENT = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default,
                      torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                      torch.ops.aten.equal.default}

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sync = func in self.SIZE_DEPENDENT
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default):
            sync = any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if sync:
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **kwargs)


def syncs_per_step(monkeypatch, tmp_path, c, src):
    """Host syncs of each training step (between two calls of the loss), with `.tolist()` / `.cpu()` /
    `.numpy()` counted too; the devices' sync-free paths taken on the CPU as on CUDA."""
    import crosscoders.train as T

    monkeypatch.setattr(A, "host_sync_is_free", lambda t: False)
    counter, marks = HostSyncs(), []
    loss = T.crosscoder_loss
    monkeypatch.setattr(T, "crosscoder_loss", lambda *a, **k: marks.append((counter.count, list(counter.ops))) or loss(*a, **k))
    for name in ("tolist", "cpu", "numpy"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            counter.count += 1
            counter.ops.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    with counter:
        train(c, src, tmp_path)
    return [(b - a, ops_b[len(ops_a):]) for (a, ops_a), (b, ops_b) in zip(marks, marks[1:], strict=False)]


@pytest.mark.parametrize("activation,sparse", [("batchtopk", False), ("batchtopk", True), ("jumprelu", False)])
def test_training_steps_do_not_wait_for_the_device(tmp_path, monkeypatch, activation, sparse):
    # steps 1..10 of 12: no log (every 4 -> steps 4 and 8 log), no checkpoint; step 0 initialises b_dec
    monkeypatch.setitem(S.CROSSOVER, "cpu", 1.0 if sparse else 0.0)
    c = cfg(activation, steps=12, log_every=4, checkpoint_every=12, autocast="none")
    per_step = syncs_per_step(monkeypatch, tmp_path, c, TRUTH.batch_source(64))
    quiet = [n for i, n in enumerate(per_step, 1) if i % 4]  # the step that ends at a log row is not quiet
    print(f"host syncs per step ({activation}, sparse={sparse}): {[n for n, _ in per_step]}")
    # the input batch's finite check runs on the prefetch thread (which the counter, thread-local, does not see)
    assert all(n == 0 for n, _ in quiet), quiet


def test_a_diverged_loss_names_its_step_and_is_never_checkpointed(tmp_path):
    def src(start):
        for i in range(start, 100):
            yield TRUTH.batch(i, 32) * (1e25 if i == 5 else 1.0)  # finite, but its squared error overflows
    with pytest.raises(FloatingPointError, match="non-finite at step 5"):
        train(cfg(checkpoint_every=6, log_every=100), src, tmp_path)  # read before the checkpoint of step 6
    assert not (tmp_path / "checkpoint/state.pt").exists()


def test_an_empty_or_dense_jumprelu_code_at_init_is_named():
    """Issue 23, bad input: family_config's 2-snapshot draw 1 (d_in 222) opens no JumpReLU latent at the default
    init threshold; hard_config opens a few; a zero threshold opens about half (a pre-activation's sign)."""
    import warnings

    from crosscoders.model import InitialCodeWarning, check_initial_code
    from crosscoders.synthetic import PlantedFeatures, family_config, hard_config

    def frac(scfg, thr):
        t = PlantedFeatures(scfg)
        m = Crosscoder(CrosscoderConfig(n_sources=scfg.n_sources, d_in=scfg.d_in, d_sae=256, activation="jumprelu",
                                        jumprelu_init_threshold=thr))
        x = t.batch(0, 128, t.norm_scale())
        with torch.no_grad():
            m.b_dec.copy_(x.mean(0))
        return check_initial_code(m, x)

    with pytest.warns(InitialCodeWarning, match=r"L0 = 0.*jumprelu_init_threshold = 0.1 .*lower it"):
        assert frac(family_config(1), 0.1) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitialCodeWarning)
        assert 0 < frac(hard_config(), 0.1) < 0.5
    with pytest.warns(InitialCodeWarning, match=r"dense code\): raise"):
        assert frac(hard_config(), 0.0) > 0.5
