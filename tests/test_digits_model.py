"""The demo's small digits flow-matching model: data, network, training, loading."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from adjointflow.demo import digits  # noqa: E402
from adjointflow.demo import weights_file  # noqa: E402
from adjointflow.demo.digits import (  # noqa: E402
    NULL_CLASS,
    TRAIN_COMMAND,
    WEIGHTS_NAME,
    DigitsVelocityNet,
    load_digits_model,
    load_digits_tensor,
    train_digits,
)
from adjointflow.demo.weights_file import read_header  # noqa: E402

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
TINY = dict(channels=8, emb_dim=16, groups=4)  # ~30k parameters: a training step takes milliseconds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    net, meta = train_digits(out, steps=30, batch=16, lr=2e-3, seed=0, log_every=5, progress=False, warmup=5)
    return out, net, meta


def test_tiny_training_writes_one_file_and_reduces_loss(tiny_run):
    out, net, meta = tiny_run
    assert sorted(f.name for f in out.iterdir()) == [WEIGHTS_NAME]  # weights + metadata, no temporary left
    on_disk = read_header(out / WEIGHTS_NAME).meta
    assert on_disk == json.loads(json.dumps(meta))
    for key in (
        "arch", "training", "final_loss", "loss_curve", "seconds", "tensors_sha256",
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


def test_training_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    """Same seed -> the same loss curve and bit-identical weights, whatever the global RNG holds; another
    seed -> other weights; and the global torch RNG is as it was (train_digits used to reseed it)."""
    def run(seed, folder, global_seed):
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        net, meta = train_digits(tmp_path / folder, steps=8, batch=8, seed=seed, log_every=2, progress=False,
                                 warmup=2, arch=TINY)
        assert torch.equal(torch.get_rng_state(), before), "train_digits changed the global torch RNG"
        return net.state_dict(), meta

    (a, ma), (b, mb), (c, _) = run(3, "a", 100), run(3, "b", 200), run(4, "c", 100)
    assert ma["loss_curve"] == mb["loss_curve"] and len(ma["loss_curve"]) == 4
    assert all(torch.equal(a[k], b[k]) for k in a) and ma["tensors_sha256"] == mb["tensors_sha256"]
    assert not torch.equal(a["in_conv.weight"], c["in_conv.weight"])


def test_load_round_trips_trained_weights(tiny_run):
    out, net, meta = tiny_run
    loaded, meta_l = load_digits_model(out)  # directory form
    loaded2, _ = load_digits_model(out / WEIGHTS_NAME)  # file form
    assert meta_l == json.loads(json.dumps(meta))
    assert not loaded.training
    sd, sdl = net.state_dict(), loaded.state_dict()
    assert sd.keys() == sdl.keys()
    assert all(torch.equal(sd[k], sdl[k]) for k in sd)
    x, t, c = torch.randn(3, 1, 16, 16), torch.rand(3), torch.tensor([1, 4, 7])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, c), net(x, t, c))
        assert torch.equal(loaded2(x, t, c), net(x, t, c))


def test_existing_weights_are_refused_before_training(tmp_path, monkeypatch):
    (tmp_path / WEIGHTS_NAME).write_bytes(b"keep me")
    monkeypatch.setattr(digits, "load_digits_tensor", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        train_digits(tmp_path, steps=1, progress=False)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == b"keep me"


# ---------------------------------------------------------------- atomic saves
def _tiny_model(tmp_path, seed):
    net, meta = train_digits(tmp_path, steps=2, batch=4, seed=seed, log_every=1, progress=False, warmup=1,
                             arch=TINY, overwrite=True)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _loads_as(path, state):
    net, _ = load_digits_model(path)
    return all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("stage", ["serialise", "rename"])
def test_a_save_interrupted_midway_keeps_the_previous_model(tmp_path, monkeypatch, stage):
    """The first write fails halfway (half a file written) or the final rename fails: the previous model
    still loads, unchanged, and no temporary file is left behind."""
    old = _tiny_model(tmp_path, seed=0)
    if stage == "serialise":
        def half_then_fail(state, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
            raise KeyboardInterrupt
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    else:
        monkeypatch.setattr(weights_file.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises((KeyboardInterrupt, OSError)):
        _tiny_model(tmp_path, seed=1)
    assert _loads_as(tmp_path, old)
    assert sorted(f.name for f in tmp_path.iterdir()) == [WEIGHTS_NAME]


def _save_forever(path, versions, started):
    i = 0
    while True:
        weights_file.save_weights(path, versions[i % 2], {"arch": TINY, "round": i})
        if i == 1:
            started.set()
        i += 1


def test_a_save_killed_by_sigkill_leaves_a_loadable_model(tmp_path):
    """Forked processes that do nothing but save the model, alternately two versions, are SIGKILLed at
    spread moments: every time the file loads and is exactly one of the two versions."""
    import multiprocessing
    import signal
    import time

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    ctx = multiprocessing.get_context("fork")  # milliseconds to start, against seconds for a fresh python
    versions = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        versions.append({k: v.detach() for k, v in DigitsVelocityNet(**TINY).state_dict().items()})
    for i, delay in enumerate((0.0, 0.003, 0.011, 0.029, 0.047)):
        folder = tmp_path / f"kill{i}"
        folder.mkdir()
        started = ctx.Event()
        proc = ctx.Process(target=_save_forever, args=(folder / WEIGHTS_NAME, versions, started), daemon=True)
        proc.start()
        try:
            assert started.wait(60)
            time.sleep(delay)
        finally:
            proc.kill()
            proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        assert _loads_as(folder, versions[0]) or _loads_as(folder, versions[1])


# ---------------------------------------------------------------- verified loads
def test_tampered_weights_raise_value_error(tmp_path):
    src = digits.DEFAULT_WEIGHTS
    if not src.is_file():
        pytest.fail(f"committed weights missing; run `{TRAIN_COMMAND}`")
    shutil.copy(src, tmp_path / WEIGHTS_NAME)
    load_digits_model(tmp_path)  # the untouched copy loads
    data = bytearray(src.read_bytes())
    data[-10] ^= 0x01  # a bit in the last tensor
    (tmp_path / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256.*corrupt"):
        load_digits_model(tmp_path / WEIGHTS_NAME)
    (tmp_path / WEIGHTS_NAME).write_bytes(src.read_bytes()[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=WEIGHTS_NAME):
        load_digits_model(tmp_path)


def _forge(tmp_path, **meta_changes):
    """A weights file holding the committed tensors under forged metadata."""
    from safetensors.torch import load_file

    header = read_header(digits.DEFAULT_WEIGHTS)
    meta = {k: v for k, v in header.meta.items() if k != "tensors_sha256"}
    meta.update(meta_changes)
    path = tmp_path / WEIGHTS_NAME
    weights_file.save_weights(path, load_file(str(digits.DEFAULT_WEIGHTS)), meta)
    return path


@pytest.mark.parametrize("arch, match", [
    (dict(channels=32768, emb_dim=65536), "architecture needs"),  # ~1.4 TB of float32 if it were allocated
    (dict(channels=10**12), "ints in"),
    (dict(channel_mult=list(range(1, 10**4))), "channel_mult"),
    (dict(groups=0), "ints in"),
    (dict(channels=33), "arch|does not describe|do not match"),
    (dict(frobnicate=1), "keys among"),
    ("big", "keys among"),
])
def test_crafted_metadata_is_refused_before_allocating(tmp_path, arch, match):
    """The architecture in the metadata must produce exactly the tensors the file holds; the network is
    built on the meta device for that check, so even a terabyte-sized claim allocates nothing."""
    path = _forge(tmp_path, arch=arch if isinstance(arch, str) else {**read_header(digits.DEFAULT_WEIGHTS)
                                                                       .meta["arch"], **arch})
    with pytest.raises(ValueError, match=match) as e:
        load_digits_model(path)
    assert str(path) in str(e.value)


def test_crafted_header_is_refused_before_reading(tmp_path):
    path = tmp_path / WEIGHTS_NAME
    good = digits.DEFAULT_WEIGHTS.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + n])
    cases = {
        "claims": (2**40).to_bytes(8, "little") + good[8:],  # header length beyond the file
        "not JSON": good[:8] + b"\xff" * n + good[8 + n:],
        "spans": None,  # a tensor declaring 10^12 elements over its few bytes
        "adjointflow": None,  # no metadata of ours
    }
    big = dict(header)
    name = next(k for k in big if k != "__metadata__")
    big[name] = dict(big[name], shape=[10**6, 10**6])
    bare = {k: v for k, v in header.items() if k != "__metadata__"}
    for key, h in (("spans", big), ("adjointflow", bare)):
        text = json.dumps(h).encode()
        cases[key] = len(text).to_bytes(8, "little") + text + good[8 + n:]
    for match, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(ValueError, match=match):
            load_digits_model(path)


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m adjointflow train-digits"):
        load_digits_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m adjointflow train-digits"):
        load_digits_model(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- the committed model
def test_committed_model_loads_and_is_trained():
    """Checked independently of the code that trained and saved it: the network holds exactly the file's
    tensors (read by safetensors itself), its held-out flow-matching loss (own draws of t and noise) is a
    small fraction of the loss of predicting v = 0 and of an untrained network, it denoises, and its
    class label steers the prediction towards that class."""
    from safetensors.torch import load_file

    net, meta = load_digits_model()
    assert isinstance(net, DigitsVelocityNet) and not net.training
    assert meta["prediction"] == "velocity" and meta["null_class"] == NULL_CLASS
    raw = load_file(str(digits.DEFAULT_WEIGHTS))
    assert raw.keys() == net.state_dict().keys()
    assert all(torch.equal(raw[k], v) for k, v in net.state_dict().items())

    x, y = load_digits_tensor("test")
    g = torch.Generator().manual_seed(99)
    t = torch.rand(x.shape[0], generator=g).clamp(0.05, 0.95)
    eps = torch.randn(x.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x + tb * eps
    torch.manual_seed(5)
    untrained = DigitsVelocityNet(**meta["arch"]).eval()
    with torch.no_grad():
        untrained.out_conv.weight.normal_(0, 0.05)  # zero-initialised output: give the baseline a voice
        loss = float((net(xt, t, y) - (eps - x)).square().mean())
        loss_untrained = float((untrained(xt, t, y) - (eps - x)).square().mean())
    loss_zero = float((eps - x).square().mean())
    assert loss < 0.15 * loss_zero and loss < 0.15 * loss_untrained, (loss, loss_zero, loss_untrained)

    # one-step denoising from t = 0.5 recovers the digit far better than the noisy input does
    with torch.no_grad():
        x05 = 0.5 * x + 0.5 * eps
        x0_hat = x05 - 0.5 * net(x05, torch.full((x.shape[0],), 0.5), y)
    assert (x0_hat - x).square().mean() < 0.25 * (x05 - x).square().mean()

    # from mostly noise (t = 0.9), the predicted digit is nearest to the mean image of the class asked for
    xtr, ytr = load_digits_tensor("train")
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(10)]).flatten(1)
    asked = (y + 3) % 10  # not the digit under the noise
    x09 = 0.1 * x + 0.9 * eps
    with torch.no_grad():
        pred = x09 - 0.9 * net(x09, torch.full((x.shape[0],), 0.9), asked)
    nearest = torch.cdist(pred.flatten(1), means).argmin(1)
    assert float((nearest == asked).float().mean()) > 0.8
    # the metadata's held-out loss is this file's (same fixed noise as at training time)
    with torch.no_grad():
        recorded = float(digits._flow_loss(net, x, y, torch.Generator().manual_seed(1234)))
    assert recorded == pytest.approx(meta["test_loss_ema"], rel=1e-4)
