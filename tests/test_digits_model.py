"""The demo's small digits flow-matching model: data, network, training, loading."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from adjointflow.demo import digits  # noqa: E402
from adjointflow.demo.digits import (  # noqa: E402
    META_NAME,
    NULL_CLASS,
    TRAIN_COMMAND,
    WEIGHTS_NAME,
    DigitsVelocityNet,
    load_digits_model,
    load_digits_tensor,
    train_digits,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- data
def test_loader_shapes_range_dtype():
    x, y = load_digits_tensor("train")
    assert x.shape == (1500, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1500,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9  # uses the whole range
    assert set(y.tolist()) == set(range(10))
    xt, yt = load_digits_tensor("test", dtype=torch.float64)
    assert xt.shape == (297, 1, 16, 16) and xt.dtype == torch.float64 and yt.shape == (297,)
    x8, _ = load_digits_tensor("train", size=8)
    assert x8.shape == (1500, 1, 8, 8)
    # 8x8 values are exactly pixels/16*2-1
    assert torch.allclose((x8 + 1) / 2 * 16, ((x8 + 1) / 2 * 16).round(), atol=1e-5)


def test_loader_deterministic_and_split_is_a_partition():
    a, ya = load_digits_tensor("train", size=8, dtype=torch.float64)
    b, yb = load_digits_tensor("train", size=8, dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(ya, yb)
    t, yt = load_digits_tensor("test", size=8, dtype=torch.float64)
    full, yf = load_digits_tensor("all", size=8, dtype=torch.float64)
    assert a.shape[0] + t.shape[0] == full.shape[0] == 1797

    def rows(imgs, labels):  # multiset of (label, pixels) rows
        return sorted(
            (int(lab), tuple(img.flatten().tolist())) for img, lab in zip(imgs, labels)
        )

    assert rows(torch.cat([a, t]), torch.cat([ya, yt])) == rows(full, yf)
    # train is a shuffle, not sklearn's first 1500
    assert not torch.equal(a, full[:1500])


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_digits_tensor("val")
    with pytest.raises(ValueError, match="size"):
        load_digits_tensor("train", size=0)
    with pytest.raises(TypeError, match="dtype"):
        load_digits_tensor("train", dtype=torch.int64)


# ---------------------------------------------------------------- network
@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    net = DigitsVelocityNet()
    # the output conv is zero-initialised; perturb it so outputs depend on the inputs
    with torch.no_grad():
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return net.eval()


def test_net_shapes_dtype_and_cond(small_net):
    net = small_net
    assert sum(p.numel() for p in net.parameters()) < 1_000_000
    x = torch.randn(5, 1, 16, 16)
    t = torch.rand(5)
    with torch.no_grad():
        out = net(x, t)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        labels = torch.tensor([0, 1, 2, 3, 9])
        out_c = net(x, t, labels)
        assert out_c.shape == x.shape
        assert not torch.allclose(out_c, out)
        # cond=None is the null class
        assert torch.allclose(net(x, t, torch.full((5,), NULL_CLASS)), out)
        # scalar t broadcasts
        assert torch.allclose(net(x, torch.tensor(0.3), labels), net(x, torch.full((5,), 0.3), labels))
        # soft labels: one-hot reproduces integer labels; 10 columns put the rest on null
        oh = F.one_hot(labels, 11).float()
        assert torch.allclose(net(x, t, oh), out_c, atol=1e-5)
        assert torch.allclose(net(x, t, oh[:, :10]), out_c, atol=1e-5)
        # float64 state in, float64 out
        assert net(x.double(), t.double(), labels).dtype == torch.float64
        # per-sample independence
        assert torch.allclose(net(x[2:3], t[2:3], labels[2:3]), out_c[2:3], atol=1e-5)


def test_net_soft_cond_is_differentiable(small_net):
    x = torch.randn(2, 1, 16, 16)
    w = torch.full((2, 10), 0.1, requires_grad=True)
    small_net(x, torch.rand(2), w).square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_net_rejects_bad_inputs(small_net):
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="shape"):
        small_net(torch.randn(2, 3, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="t must"):
        small_net(x, torch.rand(3))
    with pytest.raises(ValueError, match="cond"):
        small_net(x, torch.rand(2), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        small_net(x, torch.rand(2), torch.tensor([1, 11]))
    with pytest.raises(TypeError, match="cond"):
        small_net(x, torch.rand(2), torch.tensor([True, False]))


# ---------------------------------------------------------------- training + loading
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    net, meta = train_digits(out, steps=30, batch=16, lr=2e-3, seed=0, log_every=5, progress=False, warmup=5)
    return out, net, meta


def test_tiny_training_writes_files_and_reduces_loss(tiny_run):
    out, net, meta = tiny_run
    assert (out / WEIGHTS_NAME).is_file() and (out / META_NAME).is_file()
    on_disk = json.loads((out / META_NAME).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for key in (
        "arch", "training", "final_loss", "loss_curve", "seconds", "weights_sha256",
        "versions", "n_params", "test_loss_ema",
    ):
        assert key in on_disk, key
    assert on_disk["versions"]["sklearn"]
    assert on_disk["training"]["steps"] == 30 and on_disk["training"]["batch"] == 16
    curve = on_disk["loss_curve"]
    assert [c["step"] for c in curve] == [5, 10, 15, 20, 25, 30]
    assert on_disk["final_loss"] == curve[-1]["loss"]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert not net.training
    assert (out / WEIGHTS_NAME).stat().st_size < 5_000_000


def test_tiny_training_is_seeded(tmp_path, tiny_run):
    _, _, meta = tiny_run
    _, meta2 = train_digits(tmp_path, steps=10, batch=16, seed=0, log_every=5, progress=False, warmup=5)
    assert meta2["loss_curve"][0] == meta["loss_curve"][0]


def test_load_round_trips_trained_weights(tiny_run):
    out, net, meta = tiny_run
    loaded, meta_l = load_digits_model(out)  # directory form
    loaded2, _ = load_digits_model(out / WEIGHTS_NAME)  # file form
    assert meta_l["weights_sha256"] == meta["weights_sha256"]
    assert not loaded.training
    sd, sdl = net.state_dict(), loaded.state_dict()
    assert sd.keys() == sdl.keys()
    assert all(torch.equal(sd[k], sdl[k]) for k in sd)
    x, t, c = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([1, 4, 7])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c), net(x, t, c))
        assert torch.equal(loaded2(x, t, c), net(x, t, c))


def test_tampered_weights_raise_value_error(tmp_path):
    src = digits.DEFAULT_DIR
    if not (src / WEIGHTS_NAME).is_file():
        pytest.fail(f"committed weights missing; run `{TRAIN_COMMAND}`")
    shutil.copy(src / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    shutil.copy(src / META_NAME, tmp_path / META_NAME)
    load_digits_model(tmp_path)  # the untouched copy loads
    data = bytearray((tmp_path / WEIGHTS_NAME).read_bytes())
    data[-10] ^= 0x01
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_digits_model(tmp_path / WEIGHTS_NAME)


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m adjointflow train-digits"):
        load_digits_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m adjointflow train-digits"):
        load_digits_model(tmp_path / "nope.safetensors")
    # weights present but metadata missing
    shutil.copy(digits.DEFAULT_DIR / WEIGHTS_NAME, tmp_path / WEIGHTS_NAME)
    with pytest.raises(FileNotFoundError, match=META_NAME):
        load_digits_model(tmp_path)


# ---------------------------------------------------------------- the committed model
def test_committed_model_loads_and_is_trained():
    net, meta = load_digits_model()
    assert isinstance(net, DigitsVelocityNet) and not net.training
    assert meta["prediction"] == "velocity" and meta["null_class"] == NULL_CLASS
    assert meta["n_params"] == sum(p.numel() for p in net.parameters()) < 1_000_000
    # the recorded held-out loss is reproduced (same fixed noise), and it is a trained value
    x, y = load_digits_tensor("test")
    with torch.no_grad():
        loss = float(digits._flow_loss(net, x, y, torch.Generator().manual_seed(1234)))
    assert loss == pytest.approx(meta["test_loss_ema"], rel=1e-4)
    assert loss < 0.16
    # one-step denoising from t = 0.5 recovers the digit far better than the noisy input does
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    t = 0.5
    xt = (1 - t) * x + t * eps
    with torch.no_grad():
        x0_hat = xt - t * net(xt, torch.full((x.shape[0],), t), y)
    assert (x0_hat - x).square().mean() < 0.25 * (xt - x).square().mean()


def test_bundled_bespoke_solver_loads_for_the_bundled_model_only():
    """The demo's bespoke solver (adjointflow/demo/bespoke_digits.py) loads for the committed model and
    beats its base (midpoint, identity parameters) against dopri5 on fresh latents; another model is refused."""
    import adjointflow as af
    from adjointflow.demo.bespoke_digits import BUNDLED, load_bundled_bespoke
    from adjointflow.demo.run import load_denoiser
    from adjointflow.demo.sampling import dopri5_reference

    den = load_denoiser()[0]
    solver = load_bundled_bespoke(den)
    g = solver.timesteps()
    x = torch.randn(10, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    y = torch.arange(10)
    ref, _ = dopri5_reference(den, x, g, y, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        err_b = float((af.solve(den, x, g, solver, cond=y).x - ref).pow(2).mean().sqrt())
        base = af.BespokeSolver(BUNDLED[10][1], "rk2")  # identity parameters = midpoint on a uniform grid
        err_m = float((af.solve(den, x, base.timesteps(float(g[0]), float(g[-1])), base, cond=y).x - ref)
                      .pow(2).mean().sqrt())
    assert err_b < 0.75 * err_m, (err_b, err_m)
    other = af.Denoiser(den.net, af.LinearFlow(), "velocity", net_time=lambda t: 0.5 * t)
    with pytest.raises(ValueError):
        load_bundled_bespoke(other)
