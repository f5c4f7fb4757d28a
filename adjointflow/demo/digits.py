"""A small class-conditional flow-matching model on scikit-learn's bundled 8x8 digits.

Everything here runs on one CPU thread in minutes and needs no download: the data is
``sklearn.datasets.load_digits`` (1797 images, pixel values 0..16), upsampled bilinearly to
16x16 and scaled to ``[-1, 1]``.

Convention (the library's, see docs/design.md §2): ``t`` in ``[0, 1]``, ``t = 0`` data, ``t = 1`` noise,
rectified-flow path ``x_t = (1 - t) x0 + t eps`` (``adjointflow.schedules.LinearFlow``), and the
network predicts the velocity ``v = dx_t/dt = eps - x0`` (prediction ``"velocity"``). Sampling
integrates from ``t = 1`` down to ``t = 0``.

API::

    x, y = load_digits_tensor("train")            # (1500, 1, 16, 16) in [-1, 1], labels (1500,)
    net, meta = load_digits_model()               # committed EMA weights, eval mode
    v = net(x_t, t, cond)                          # t: (B,) in [0, 1]; cond: (B,) long or None
    train_digits("out_dir", steps=..., ...)       # writes digits_flow.safetensors (weights + metadata)

``cond`` holds class labels 0..9; ``None`` or the label ``NULL_CLASS`` (= 10) means
unconditional (the model was trained with 10 % label dropout, so classifier-free guidance
``v = v_null + w (v_cond - v_null)`` works).

Train from the command line with ``python -m adjointflow train-digits [--out DIR] [--steps N]``
(``python -m adjointflow.demo.digits`` is the same command).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NULL_CLASS",
    "NUM_CLASSES",
    "WEIGHTS_NAME",
    "DEFAULT_DIR",
    "DEFAULT_WEIGHTS",
    "TRAIN_COMMAND",
    "load_digits_tensor",
    "DigitsVelocityNet",
    "train_digits",
    "load_digits_model",
]

NUM_CLASSES = 10
NULL_CLASS = 10  # label index meaning "no label" (classifier-free guidance)
WEIGHTS_NAME = "digits_flow.safetensors"
DEFAULT_DIR = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = DEFAULT_DIR / WEIGHTS_NAME
TRAIN_COMMAND = "python -m adjointflow train-digits"

_SPLIT_SEED = 0
_N_TRAIN = 1500


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def load_digits_tensor(
    split: str = "train", size: int = 16, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of sklearn's digits.

    ``images`` has shape ``(N, 1, size, size)``, values in ``[-1, 1]`` (sklearn's 0..16 pixel
    values mapped linearly, then bilinearly resized from 8x8); ``labels`` is a ``(N,)`` int64
    tensor of digits 0..9. The split is a fixed permutation (seed 0) of the 1797 images:
    the first 1500 are ``"train"``, the remaining 297 ``"test"``; ``"all"`` returns all 1797
    in sklearn's order.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - sklearn is a declared demo dependency
        raise ImportError(
            "the digits demo needs scikit-learn: pip install 'adjointflow[demo]'"
        ) from exc

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)  # (1797, 8, 8), 0..16
    labels = np.asarray(data.target, dtype=np.int64)
    if split != "all":
        perm = np.random.RandomState(_SPLIT_SEED).permutation(len(images))
        idx = perm[:_N_TRAIN] if split == "train" else perm[_N_TRAIN:]
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(images).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(-1.0, 1.0).to(dtype).contiguous()
    return x, torch.from_numpy(labels).clone()


# --------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in ``[0, 1]`` (scaled by 1000, as in DDPM), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DigitsVelocityNet(nn.Module):
    """Compact U-Net predicting the rectified-flow velocity ``eps - x0`` for 16x16 digits.

    ``forward(x, t, cond=None)``: ``x`` (B, C, H, W), ``t`` a (B,) tensor (or a scalar) in
    ``[0, 1]`` with ``t = 0`` data and ``t = 1`` noise, ``cond`` an optional (B,) LongTensor of
    labels 0..9 (``NULL_CLASS`` = 10, or ``cond=None``, means unconditional), or a float
    tensor of soft labels, (B, 11) weights over the 11 class embeddings (one-hot reproduces the
    integer labels) or (B, 10) with the rest of the weight on the null class: this form is
    differentiable, for gradients w.r.t. the conditioning. Returns a tensor
    shaped like ``x`` and of ``x``'s dtype (the computation runs in the parameters' dtype; call
    ``net.double()`` for float64 throughout).

    Architecture: the image is cut into ``patch x patch`` patches (pixel-unshuffle, 16x16x1 ->
    8x8x4 by default), then a small U-Net: one residual block per resolution (8x8 with
    ``channels``, 4x4 with ``2 * channels`` for ``channel_mult=(1, 2)``), two blocks in the
    middle, skip connections on the way up, and pixel-shuffle back to full resolution. The
    sinusoidal time embedding (-> MLP) plus a class embedding enters every block as a
    GroupNorm scale/shift. Defaults: about 0.52M parameters.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2),
        emb_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        groups: int = 8,
        patch: int = 2,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult must have at least one level")
        self.config = dict(
            in_channels=int(in_channels),
            channels=int(channels),
            channel_mult=list(channel_mult),
            emb_dim=int(emb_dim),
            num_classes=int(num_classes),
            groups=int(groups),
            patch=int(patch),
        )
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch!r}")
        self.patch = int(patch)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_class = num_classes
        self.emb_dim = emb_dim

        self.time_mlp = nn.Sequential(
            nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last index = null class
        nn.init.normal_(self.class_emb.weight, std=0.02)

        chans = [channels * m for m in channel_mult]
        self.in_conv = nn.Conv2d(in_channels * patch * patch, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        prev = chans[0]
        for i, ch in enumerate(chans):
            self.down_blocks.append(_ResBlock(prev, ch, emb_dim, groups))
            prev = ch
            if i < len(chans) - 1:
                self.downsamples.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = nn.ModuleList(
            [_ResBlock(prev, prev, emb_dim, groups), _ResBlock(prev, prev, emb_dim, groups)]
        )
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch = chans[i]
            self.up_blocks.append(_ResBlock(prev + ch, ch, emb_dim, groups))
            prev = ch
            if i > 0:
                self.upsamples.append(nn.Conv2d(ch, chans[i - 1], 3, padding=1))
                prev = chans[i - 1]
        self.out_norm = nn.GroupNorm(min(groups, prev), prev)
        self.out_conv = nn.Conv2d(prev, in_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def _class_embedding(self, cond, b: int, device, wdtype) -> torch.Tensor:
        if cond is None:
            cond = torch.full((b,), self.null_class, dtype=torch.long, device=device)
        if not isinstance(cond, torch.Tensor):
            raise TypeError(f"cond must be a tensor or None, got {type(cond).__name__}")
        k = self.num_classes + 1
        if cond.dtype.is_floating_point:
            # soft labels: weights over the (num_classes + 1) embeddings, the last one null;
            # (B, num_classes) weights get the null embedding with weight 1 - sum. Differentiable.
            if cond.dim() != 2 or cond.shape[1] not in (k - 1, k) or cond.shape[0] not in (1, b):
                raise ValueError(
                    f"float cond must have shape ({b}, {k - 1}) or ({b}, {k}) (weights over the "
                    f"class embeddings), got {tuple(cond.shape)}"
                )
            w = cond.to(device=device, dtype=wdtype)
            if w.shape[1] == k - 1:
                w = torch.cat([w, 1 - w.sum(dim=1, keepdim=True)], dim=1)
            return w.expand(b, k) @ self.class_emb.weight
        if cond.dtype == torch.bool or cond.is_complex():
            raise TypeError(f"cond must hold integer labels or float weights, got dtype {cond.dtype}")
        cond = cond.to(device=device, dtype=torch.long).reshape(-1)
        if cond.shape[0] == 1 and b != 1:
            cond = cond.expand(b)
        if cond.shape[0] != b:
            raise ValueError(f"cond must have shape ({b},), got {tuple(cond.shape)}")
        if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > self.null_class):
            raise ValueError(
                f"labels must be in 0..{self.null_class} ({self.null_class} = null class), got "
                f"values in {int(cond.min())}..{int(cond.max())}"
            )
        return self.class_emb(cond)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Velocity ``v = eps - x0`` at ``(x, t)`` (``x_t = (1-t) x0 + t eps``); ``cond``: labels 0-9 (10 = null)
        as a LongTensor, or float class weights (differentiable), or ``None`` (unconditional)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        t = t.reshape(-1)
        if t.shape[0] != b:
            raise ValueError(f"t must have shape ({b},) or be a scalar, got {tuple(t.shape)}")
        wdtype = self.in_conv.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(wdtype))
        emb = F.silu(emb + self._class_embedding(cond, b, x.device, wdtype))

        if x.shape[-1] % (self.patch * 2 ** (len(self.down_blocks) - 1)) or x.shape[-2] % (
            self.patch * 2 ** (len(self.down_blocks) - 1)
        ):
            raise ValueError(
                f"H and W must be divisible by {self.patch * 2 ** (len(self.down_blocks) - 1)}, "
                f"got {tuple(x.shape[-2:])}"
            )
        h = x.to(wdtype)
        if self.patch > 1:
            h = F.pixel_unshuffle(h, self.patch)
        h = self.in_conv(h)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        for block in self.mid:
            h = block(h, emb)
        for j, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsamples):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsamples[j](h)
        h = self.out_conv(F.silu(self.out_norm(h)))
        if self.patch > 1:
            h = F.pixel_shuffle(h, self.patch)
        return h.to(x.dtype)


# --------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------
def _flow_loss(net, x0, y, g) -> torch.Tensor:
    b = x0.shape[0]
    t = torch.rand(b, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    tb = t.view(-1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    return F.mse_loss(net(xt, t, y), eps - x0)


def train_digits(
    out_dir: str | os.PathLike | None = None,
    steps: int = 7000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 100,
    progress: bool = True,
    *,
    ema_decay: float = 0.999,
    label_drop: float = 0.1,
    warmup: int = 200,
    arch: dict[str, Any] | None = None,
    num_threads: int | None = 1,
    overwrite: bool = False,
) -> tuple[DigitsVelocityNet, dict[str, Any]]:
    """Train the digits velocity model by flow matching and save it into ``out_dir``.

    Loss: ``|| v_theta(x_t, t, y) - (eps - x0) ||^2`` with ``t ~ U(0, 1)``, ``eps ~ N(0, I)``,
    ``x_t = (1 - t) x0 + t eps``, labels dropped to the null class with probability
    ``label_drop``. Adam (linear warm-up, cosine decay to 5 % of ``lr``), gradient clipping at
    1, and an EMA of the weights (the EMA weights are what is saved and returned).

    Writes one file, ``digits_flow.safetensors``, into ``out_dir`` (default: the package's
    ``adjointflow/demo/``): the float32 EMA weights and, in its header, the metadata (settings,
    ``arch`` kwargs, loss curve, final loss, test loss, versions, seconds, SHA-256 of the tensors).
    The write is atomic (:mod:`adjointflow.demo.weights_file`): an interrupted run leaves the
    previous model intact. An existing file is a ``FileExistsError`` (raised before training)
    unless ``overwrite=True``. Returns ``(ema_net in eval mode, metadata)``.

    The seed fixes the run: initial weights, batches, labels dropped, times and noise. The global
    torch RNG is left as found (the initialisation draws from it inside ``torch.random.fork_rng``);
    ``num_threads`` sets ``torch.set_num_threads`` for the run (restored afterwards); ``None``
    leaves it alone.
    """
    for name, val in (("steps", steps), ("batch", batch), ("log_every", log_every)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if not 0 < lr <= 1:  # Adam moves every weight by about lr per step: beyond 1 it can only diverge
        raise ValueError(f"lr must be in (0, 1], got {lr!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    if not 0.0 <= label_drop <= 1.0:
        raise ValueError(f"label_drop must be in [0, 1], got {label_drop!r}")
    out = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    wpath = out / WEIGHTS_NAME
    if wpath.exists() and not overwrite:
        bundled = " (the bundled model the demo uses)" if out.resolve() == DEFAULT_DIR else ""
        raise FileExistsError(
            f"{wpath} exists{bundled}; pass overwrite=True (command line: --force) to replace it, "
            "or another output folder (--out DIR)"
        )
    out.mkdir(parents=True, exist_ok=True)
    from .weights_file import save_weights

    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        t_start = time.perf_counter()
        g = torch.Generator().manual_seed(seed)
        x_train, y_train = load_digits_tensor("train")
        arch = dict(arch or {})
        with torch.random.fork_rng(devices=[]):  # nn.init draws from the global RNG; restore it afterwards
            torch.manual_seed(seed)
            net = DigitsVelocityNet(**arch)
        arch = dict(net.config)
        ema = copy.deepcopy(net).requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=lr)

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            p = (step - warmup) / max(1, steps - warmup)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        n = x_train.shape[0]
        curve: list[dict[str, float]] = []
        window: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="train digits", dynamic_ncols=True)
        net.train()
        for step in range(steps):
            idx = torch.randint(0, n, (batch,), generator=g)
            x0, y = x_train[idx], y_train[idx].clone()
            drop = torch.rand(batch, generator=g) < label_drop
            y[drop] = NULL_CLASS
            loss = _flow_loss(net, x0, y, g)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - d)
                for be, b_ in zip(ema.buffers(), net.buffers()):
                    be.copy_(b_)
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                mean = float(np.mean(window))
                curve.append({"step": step + 1, "loss": mean})
                window = []
                msg = f"step {step + 1}/{steps}  loss {mean:.4f}  lr {sched.get_last_lr()[0]:.2e}"
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4f}")
                    bar.write(msg)
                else:
                    print(msg, flush=True)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_seconds = time.perf_counter() - t_start

        # held-out flow-matching loss of the EMA model, fixed noise (comparable across runs)
        ema.eval()
        x_test, y_test = load_digits_tensor("test")
        with torch.no_grad():
            test_loss = float(_flow_loss(ema, x_test, y_test, torch.Generator().manual_seed(1234)))
            test_loss_uncond = float(
                _flow_loss(ema, x_test, None, torch.Generator().manual_seed(1234))
            )

        state = {k: v.detach().to(torch.float32).contiguous() for k, v in ema.state_dict().items()}
        import sklearn

        meta: dict[str, Any] = {
            "model": "DigitsVelocityNet",
            "convention": "x_t = (1 - t) x0 + t eps; t=0 data, t=1 noise; output v = eps - x0",
            "schedule": "LinearFlow",
            "prediction": "velocity",
            "null_class": NULL_CLASS,
            "image_size": 16,
            "data": {
                "source": "sklearn.datasets.load_digits",
                "split_seed": _SPLIT_SEED,
                "n_train": int(n),
                "n_test": int(x_test.shape[0]),
                "scaling": "pixels/16*2-1, bilinear 8x8->16x16",
            },
            "arch": arch,
            "n_params": sum(p.numel() for p in net.parameters()),
            "training": {
                "steps": steps,
                "batch": batch,
                "lr": lr,
                "lr_schedule": f"linear warmup {warmup} steps, cosine to 0.05*lr",
                "optimizer": "Adam",
                "grad_clip": 1.0,
                "ema_decay": ema_decay,
                "label_drop": label_drop,
                "t_sampling": "uniform(0,1)",
                "seed": seed,
                "log_every": log_every,
                "num_threads": torch.get_num_threads(),
            },
            "final_loss": curve[-1]["loss"],
            "test_loss_ema": test_loss,
            "test_loss_ema_uncond": test_loss_uncond,
            "loss_curve": curve,
            "seconds": round(train_seconds, 1),
            "versions": {
                "torch": torch.__version__,
                "sklearn": sklearn.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
        meta = save_weights(wpath, state, meta, overwrite=overwrite)
        return ema, meta
    finally:
        if num_threads is not None:
            torch.set_num_threads(prev_threads)


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
_ARCH_KEYS = ("in_channels", "channels", "channel_mult", "emb_dim", "num_classes", "groups", "patch")


def _net_for_header(header) -> DigitsVelocityNet:
    """The network the metadata's ``arch`` describes, built on the meta device (no memory), after checking
    that its parameters are exactly the float32 tensors the file declares: a crafted ``arch`` cannot make
    the loader allocate more than the file holds."""
    path, specs = header.path, header.tensors

    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: {why}. Retrain with `{TRAIN_COMMAND}`.")

    arch = header.meta.get("arch")
    if not isinstance(arch, dict) or not set(arch) <= set(_ARCH_KEYS):
        raise bad(f"metadata 'arch' must be an object with keys among {_ARCH_KEYS}, got {arch!r}")
    # bounds first, so that even building the (memory-free) meta network stays cheap
    limit = sum(math.prod(s.shape) for s in specs.values())
    for key, val in arch.items():
        vals = val if key == "channel_mult" and isinstance(val, list) else [val]
        if key == "channel_mult" and not (isinstance(val, list) and 1 <= len(val) <= len(specs)):
            raise bad(f"arch.channel_mult must be a list of 1..{len(specs)} ints, got {val!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limit for v in vals):
            raise bad(f"arch.{key} must hold ints in 1..{limit} (the file's element count), got {val!r}")
    try:
        with torch.device("meta"):
            net = DigitsVelocityNet(**arch)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as exc:
        raise bad(f"metadata 'arch' does not describe a network ({exc})") from None
    want = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    have = {k: (s.shape, s.dtype) for k, s in specs.items()}
    if set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise bad(f"the tensors do not match the architecture in its metadata (missing {missing[:3]}, "
                  f"unexpected {extra[:3]})")
    for k, (shape, dtype) in want.items():
        if have[k] != (shape, "F32") or dtype != torch.float32:
            raise bad(f"tensor {k!r} is {have[k][1]}{list(have[k][0])}, the architecture needs F32{list(shape)}")
    return net


def load_digits_model(
    path: str | os.PathLike | None = None,
) -> tuple[DigitsVelocityNet, dict[str, Any]]:
    """Load the digits model: ``(net in eval mode, metadata dict)``.

    ``path`` is a ``digits_flow.safetensors`` file (weights and metadata in one file, see
    :mod:`adjointflow.demo.weights_file`) or a directory holding one; the default is the committed
    model in ``adjointflow/demo/``. The header is checked against the file size and the metadata's
    architecture before anything is allocated, and the tensors against their SHA-256: a damaged or
    crafted file is a ``ValueError`` naming it, a missing one a ``FileNotFoundError``.
    Parameters keep ``requires_grad=True`` (so gradients w.r.t. them can be taken); call
    ``net.requires_grad_(False)`` when not needed.
    """
    from .weights_file import read_header, read_tensors

    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise FileNotFoundError(
            f"digits model file not found: {p}. Train the model with `{TRAIN_COMMAND}` "
            f"(or `python -m adjointflow train-digits --out DIR`), which writes {WEIGHTS_NAME}."
        )
    header = read_header(p)
    net = _net_for_header(header).to_empty(device="cpu")
    net.load_state_dict(read_tensors(header))
    net.eval()
    return net, header.meta


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m adjointflow.demo.digits [args]`` is ``python -m adjointflow train-digits [args]``."""
    from ..cli import main as cli_main

    return cli_main(["train-digits", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
