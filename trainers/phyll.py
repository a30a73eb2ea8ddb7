"""`train_phyll`: Physical Local Learning (Momeni et al., Science 382, 1297, 2023), backprop-free.

A PhyLL network is a chain of blocks. Block b is a physical transformation Phi_b (the device with a
fixed parameter vector theta_b: seeded random inside the safe envelope, empty when n_params == 0)
followed by a trainable digital linear layer:

    u_b  = map_b(h_b)                          device input, inside the device's input range
    f_b  = standardise(Phi_b(u_b)) [; u_b]     measured features (optional skip: the input too)
    z_b  = W_b f_b + c_b                       the block's signed output
    h_b+1 = z_b.detach()                       the only thing the next block sees

Only forward passes reach the device; gradients exist only inside each block's linear layer, which
learns from its own local loss on its own measurements. Nothing is trained across blocks, and no
twin of the device is needed.

In silico (`in_silico=True`, the multifidelity sweep's screen): the twin (`config.twin`, obtained as
PAT obtains it, `trainers.twin_keeper`) stands in for the device in every forward pass of training and
of the per-epoch validation; epochs are selected on the twin's validation, and the device measures
the validation split once, on the selected weights, after the last epoch. Warm start (`init_from`):
the weights of another PhyLL training's selected epoch; each block's feature standardisation is
measured again at its first measurement here.

Choices (documented, not trained):
- Block 0 input: the features x in [0, 1] are clamped to [0, 1], tiled/truncated to n_inputs and
  (supervised) the first n_classes entries are replaced by the one-hot label scaled to the row's
  maximum; then mapped affinely [0, 1] -> the device's input range.
- Later blocks: the previous block's output z is normalised per row by its largest magnitude,
  z / max|z| in [-1, 1], tiled/truncated to n_inputs and mapped affinely onto the input range. The
  map is fixed (no parameters), and a row's goodness (a cosine, scale-free) is unaffected by it.
- Feature standardisation: each block's measured outputs are standardised per output with a mean and
  standard deviation frozen at the block's first measurement (a calibration; kept in the state).
- Goodness: G(z) = cos(|z|, r_b) with r_b a fixed random unit vector (Gaussian entries) per block.
  Loss: mean softplus(-alpha (G(pos) - G(neg))) over pairs (a sample with its true label, the same
  sample with a wrong label drawn uniformly, redrawn every epoch).
- Inference: embed every candidate label, run all blocks, sum goodness over blocks, argmax.
- Unsupervised variant (`unsupervised=True`): positives are the inputs themselves, negatives are
  self-contrastive hybrids (each feature taken from the sample or from a different, random sample
  under a random half/half mask, redrawn every epoch); a digital linear readout (softmax, cross
  entropy) is then trained on the learned features [z_b / |z_b|] of all blocks.

Scheduling (what the device is asked, per epoch): block by block, the whole training set (positives
and negatives, 2N rows) is measured once, in calls of at most min(max_rows, eval_batch_size) rows,
and that one measurement serves every minibatch and every one of the `inner_steps` optimiser steps
of the epoch. The block's updated outputs then form the next block's inputs, measured once likewise.
Training therefore costs n_blocks * ceil(2N / rows_per_call) device calls per epoch (reported as
`device_calls_train`); evaluation on the device adds its own calls (reported in `device_calls`).
Measurements are redone every epoch, so the blocks follow a drifting device.
"""
from __future__ import annotations

import math
import time

import torch

from actors.outputs import dead_outputs

from .config import PhyLLConfig
from .encoders import build_encoder
from .metering import MeteredDevice
from .networks import tile_to
from .checkpoint import load_init, restore, selected_weights, training_state
from .optim import Adam, make_optimizer
from .results import result_of
from .selection import Selection, final_pass, select_on_twin
from .twin_keeper import TwinDevice, TwinKeeper
from .types import Dataset, Report, TrainResult

_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------
# Pieces (pure functions, tested on hand-computed cases)
# ----------------------------------------------------------------------------------------------------
def embed_labels(x: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Replace the first n_classes entries of each row by its one-hot label scaled to the row's maximum
    (the maximum of the row as given; 1 where that is not positive)."""
    if x.shape[1] < n_classes:
        raise ValueError(f"cannot embed {n_classes} labels in rows of {x.shape[1]} values")
    peak = x.max(dim=1).values
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    out = x.clone()
    out[:, :n_classes] = 0.0
    out[torch.arange(x.shape[0]), labels] = peak
    return out


def goodness(z: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between |z| (rows) and the unit vector r: G[B] in [-1, 1]."""
    a = z.abs()
    return (a @ r) / (a.norm(dim=1) * r.norm() + _EPS)


def phyll_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean log(1 + exp(-alpha (G(pos) - G(neg))))."""
    return torch.nn.functional.softplus(-alpha * (g_pos - g_neg)).mean()


def wrong_labels(y: torch.Tensor, n_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A label different from y, uniform over the n_classes - 1 others."""
    shift = torch.randint(1, n_classes, y.shape, generator=generator)
    return (y + shift) % n_classes


def hybrid_negatives(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Self-contrastive negatives: each row mixes its own features with those of a different random row
    under a random half/half mask."""
    n, k = x.shape
    if n < 2:
        return x.flip(1)
    other = (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n
    rank = torch.rand(n, k, generator=generator).argsort(dim=1).argsort(dim=1)
    mask = rank < k // 2  # a random half of the features comes from the other row
    return torch.where(mask, x[other], x)


def to_range(v01: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    """Affine map [0, 1] -> [lo, hi] (clamped: the device's envelope is hard)."""
    lo, hi = rng
    return (lo + (hi - lo) * v01).clamp(lo, hi)


def from_output(z: torch.Tensor) -> torch.Tensor:
    """A block's signed output -> [0, 1] by per-row max-abs normalisation (fixed, no parameters)."""
    m = z.abs().max(dim=1, keepdim=True).values.clamp_min(_EPS)
    return 0.5 * (1.0 + z / m)


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------
class PhyLLBlock(torch.nn.Module):
    """Fixed physics (theta, a buffer) + trainable linear layer + fixed goodness vector r."""

    def __init__(self, n_inputs: int, n_outputs: int, width: int, theta: torch.Tensor, skip: bool,
                 generator: torch.Generator, readout="auto"):
        super().__init__()
        if isinstance(readout, list) and max(readout) >= n_outputs:
            raise ValueError(f"readout: output {max(readout)} does not exist; the device has {n_outputs} "
                             f"outputs (0-based)")
        self.skip = skip
        self.readout_how = readout
        n_feat = n_outputs + (n_inputs if skip else 0)
        self.linear = torch.nn.Linear(n_feat, width)
        bound = 1.0 / math.sqrt(n_feat)
        with torch.no_grad():
            self.linear.weight.copy_((2 * torch.rand(width, n_feat, generator=generator) - 1) * bound)
            self.linear.bias.copy_((2 * torch.rand(width, generator=generator) - 1) * bound)
        r = torch.randn(width, generator=generator)
        self.register_buffer("r", r / r.norm())
        self.register_buffer("theta", theta.to(torch.float32).clone())
        self.register_buffer("mu", torch.zeros(n_outputs))
        self.register_buffer("sigma", torch.ones(n_outputs))
        self.register_buffer("calibrated", torch.tensor(False))
        # 1 for each device output the linear layer reads, 0 for one it ignores (`readout`); standardising
        # a dead output would turn its jitter into a unit-variance feature of pure noise.
        self.register_buffer("live", torch.ones(n_outputs))
        self._register_load_state_dict_pre_hook(self._live_of_old_states)

    def _live_of_old_states(self, state, prefix, *args) -> None:
        state.setdefault(prefix + "live", torch.ones_like(self.live))  # saved before `live` existed: all read

    @torch.no_grad()
    def calibrate(self, phi: torch.Tensor) -> None:
        if not bool(self.calibrated):
            self.mu.copy_(phi.mean(dim=0))
            self.sigma.copy_(phi.std(dim=0).clamp_min(1e-6) if phi.shape[0] > 1 else torch.ones_like(self.mu))
            if self.readout_how == "auto":
                self.live[dead_outputs(phi)] = 0.0
            elif isinstance(self.readout_how, list):
                self.live.zero_()
                self.live[self.readout_how] = 1.0
            self.calibrated.fill_(True)

    def dead(self) -> list[int]:
        """Outputs this block does not read."""
        return torch.nonzero(self.live == 0).flatten().tolist()

    def features(self, phi: torch.Tensor, u01: torch.Tensor) -> torch.Tensor:
        f = (phi - self.mu) / self.sigma * self.live
        return torch.cat([f, 2.0 * u01 - 1.0], dim=1) if self.skip else f

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear(feats)


class PhyLLNet(torch.nn.Module):
    def __init__(self, spec, config: PhyLLConfig, n_features: int, n_classes: int,
                 generator: torch.Generator, image_shape=None):
        super().__init__()
        if not config.unsupervised and spec.n_inputs < n_classes + 1:
            raise ValueError(
                f"the device '{spec.name}' has {spec.n_inputs} inputs; PhyLL embeds the label in the first "
                f"{n_classes} of them and needs at least {n_classes + 1}: use a device with more inputs"
            )
        self.encoder = build_encoder(config.encoder, n_features, spec.n_inputs, image_shape, spec.name)
        self.spec = spec
        self.n_classes = n_classes
        self.unsupervised = config.unsupervised
        width = config.width or spec.n_inputs
        lo, hi = spec.param_range
        mid, half = (lo + hi) / 2, (hi - lo) / 2
        blocks = []
        for _ in range(config.n_blocks):
            theta = mid + config.theta_scale * half * (2 * torch.rand(spec.n_params, generator=generator) - 1)
            blocks.append(PhyLLBlock(spec.n_inputs, spec.n_outputs, width, theta, config.skip, generator,
                                     config.readout))
        self.blocks = torch.nn.ModuleList(blocks)
        self.readout = None
        if config.unsupervised:
            self.readout = torch.nn.Linear(width * config.n_blocks, n_classes)
            bound = 1.0 / math.sqrt(width * config.n_blocks)
            with torch.no_grad():
                self.readout.weight.copy_((2 * torch.rand(n_classes, width * config.n_blocks,
                                                          generator=generator) - 1) * bound)
                self.readout.bias.zero_()

    def first_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Block 0's input in [0, 1] (label embedded unless unsupervised)."""
        u = self.encoder(x.clamp(0.0, 1.0))
        return u if labels is None else embed_labels(u, labels, self.n_classes)

    def next_input(self, z: torch.Tensor) -> torch.Tensor:
        return tile_to(from_output(z), self.spec.n_inputs)


@torch.no_grad()
def measure(device, u01: torch.Tensor, theta: torch.Tensor, spec, rows_per_call: int) -> torch.Tensor:
    """Phi(u) on the device, in calls of at most rows_per_call rows. Nothing here carries a gradient."""
    u = to_range(u01, spec.input_range).contiguous()
    out = []
    for i in range(0, u.shape[0], rows_per_call):
        y = device.forward(u[i : i + rows_per_call], theta)
        out.append(torch.as_tensor(y, dtype=torch.float32).reshape(-1, spec.n_outputs))
    return torch.cat(out)


@torch.no_grad()
def run_blocks(net: PhyLLNet, device, u01: torch.Tensor, rows_per_call: int) -> list[torch.Tensor]:
    """All blocks on the device from block 0's input; returns every block's output z_b."""
    zs = []
    for block in net.blocks:
        phi = measure(device, u01, block.theta, net.spec, rows_per_call)
        z = block(block.features(phi, u01))
        zs.append(z)
        u01 = net.next_input(z)
    return zs


def readout_features(zs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([z / z.norm(dim=1, keepdim=True).clamp_min(_EPS) for z in zs], dim=1)


@torch.no_grad()
def scores(net: PhyLLNet, device, x: torch.Tensor, rows_per_call: int, alpha: float = 1.0,
           max_rows: int = 8192) -> torch.Tensor:
    """Class scores [N, n_classes], measured on the device: supervised, alpha times the goodness
    summed over blocks for each candidate label; unsupervised, the readout's logits."""
    out = []
    if net.unsupervised:
        for i in range(0, x.shape[0], max_rows):
            zs = run_blocks(net, device, net.first_input(x[i : i + max_rows], None), rows_per_call)
            out.append(net.readout(readout_features(zs)))
        return torch.cat(out) if out else torch.zeros(0, net.n_classes)
    c = net.n_classes
    per = max(1, max_rows // c)
    for i in range(0, x.shape[0], per):
        xb = x[i : i + per]
        n = xb.shape[0]
        labels = torch.arange(c).repeat(n)
        u = net.first_input(xb.repeat_interleave(c, dim=0), labels)
        zs = run_blocks(net, device, u, rows_per_call)
        score = sum(goodness(z, block.r) for z, block in zip(zs, net.blocks))
        out.append(alpha * score.view(n, c))
    return torch.cat(out) if out else torch.zeros(0, c)


def predict(net: PhyLLNet, device, x: torch.Tensor, rows_per_call: int, max_rows: int = 8192) -> torch.Tensor:
    """Predicted labels, measured on the device."""
    return scores(net, device, x, rows_per_call, max_rows=max_rows).argmax(dim=1)


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean()) if y.numel() else 0.0


def _val_figures(net: PhyLLNet, device, data: Dataset, rows_per_call: int, alpha: float) -> tuple[float, float]:
    """(accuracy, cross-entropy of the class scores) of the validation split, measured on `device`."""
    val_scores = scores(net, device, data.x_val, rows_per_call, alpha)
    acc = _accuracy(val_scores.argmax(dim=1), data.y_val)
    loss = float(torch.nn.functional.cross_entropy(val_scores, data.y_val)) if len(data.y_val) else math.nan
    return acc, loss


def warm_start(net: PhyLLNet, path: str) -> None:
    """Load the selected weights of the PhyLL training at `path` (`init_from`) into `net`."""
    warm = load_init(path, ("phyll",))
    try:
        net.load_state_dict(selected_weights(warm))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        raise ValueError(f"init_from: {path} holds another network's weights ({first}); warm-start from a "
                         f"PhyLL training with the same blocks, width, skip and device") from None
    # The linear layers, theta and goodness vectors are the source's. Its feature standardisation
    # (mu, sigma) is not kept: it was measured where the source trained (for the multifidelity screen,
    # on the twin), and the twin's statistics are not the device's. Each block calibrates again at its
    # first measurement here, on this device. The outputs a block reads stay those it was trained on
    # (an output that does not vary on this device is dropped besides).
    for block in net.blocks:
        block.calibrated.fill_(False)


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------
def train_phyll(config: PhyLLConfig, device, data: Dataset, report: Report | None = None,
                state: dict | None = None, twin=None) -> TrainResult:
    """Train a PhyLL network on `device` (anything with the `Device` protocol); forward passes only.

    `state` (from `report`) resumes training. Accuracies are measured on the device, except with
    `config.in_silico`: then training and the per-epoch validation measure the twin (`twin` if given, else
    `config.twin`'s; `val_accuracy_twin`), and the device measures the validation split once, after
    the last epoch, on the weights the twin's validation selected (`val_accuracy`, NaN before). Without
    `in_silico`, `twin` is ignored: PhyLL needs no model of the device.
    """
    torch.set_num_threads(config.torch_threads)
    gen = torch.Generator().manual_seed(config.seed)
    metered = MeteredDevice(device)
    spec = metered.spec
    keeper = None
    if config.in_silico:  # twin data collection, if any, measures the device (first epoch's device_calls)
        saved = ((state or {}).get("twins") or [None])[0]
        keeper = TwinKeeper(config.twin, metered, twin, saved, init_width=config.theta_scale)
        keeper.obtain()
    # where training (and, in silico, the per-epoch validation) measures
    sim = TwinDevice(keeper.twin, spec) if keeper is not None else metered
    rows_per_call = max(1, min(spec.max_rows, config.eval_batch_size))
    net = PhyLLNet(spec, config, data.n_features, data.n_classes, gen, data.image_shape)
    decay = config.weight_decay
    optimizers = phyll_optimizers(net, config)
    opts = [optimizers[f"block{b}"] for b in range(len(net.blocks))]
    readout_opt = optimizers.get("readout")
    n = data.x_train.shape[0]
    n_train_eval = min(config.train_eval_size, n)
    train_eval_idx = torch.randperm(n, generator=gen)[:n_train_eval]
    history, start_epoch = restore(state, net, optimizers, gen)
    if state is None and config.init_from:
        warm_start(net, config.init_from)
    selection = Selection((state or {}).get("selection"))

    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.monotonic()
        train0 = metered.calls, metered.rows
        # the first epoch of this run counts the twin's data collection too
        calls0, rows0 = (0, 0) if epoch == start_epoch + 1 else train0
        x = data.x_train
        if config.unsupervised:
            u = torch.cat([net.first_input(x, None), net.first_input(hybrid_negatives(x, gen), None)])
        else:
            y_neg = wrong_labels(data.y_train, data.n_classes, gen)
            u = torch.cat([net.first_input(x, data.y_train), net.first_input(x, y_neg)])
        block_losses, pos_outputs = [], []
        for block, opt in zip(net.blocks, opts):
            phi = measure(sim, u, block.theta, spec, rows_per_call)  # one measurement per epoch
            block.calibrate(phi)
            feats = block.features(phi, u)
            f_pos, f_neg = feats[:n], feats[n:]
            perm = torch.randperm(n, generator=gen)
            total, count = 0.0, 0
            for i in range(0, n, config.batch_size):
                idx = perm[i : i + config.batch_size]
                for step in range(config.inner_steps):
                    loss = phyll_loss(goodness(block(f_pos[idx]), block.r),
                                      goodness(block(f_neg[idx]), block.r), config.alpha)
                    if step == 0:
                        total += float(loss.detach()) * len(idx)
                        count += len(idx)
                    if decay:
                        loss = loss + decay * block.linear.weight.pow(2).sum()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            block_losses.append(total / max(1, count))
            with torch.no_grad():
                z = block(feats)  # updated layer; detached: nothing flows to the next block
            pos_outputs.append(z[:n])
            u = net.next_input(z)
        calls_train, rows_train = metered.calls - train0[0], metered.rows - train0[1]

        if config.unsupervised:
            feats = readout_features(pos_outputs)
            ce = torch.nn.CrossEntropyLoss()
            for _ in range(config.readout_epochs):
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, config.batch_size):
                    idx = perm[i : i + config.batch_size]
                    loss = ce(net.readout(feats[idx]), data.y_train[idx])
                    readout_opt.zero_grad()
                    loss.backward()
                    readout_opt.step()
            with torch.no_grad():
                train_acc = _accuracy(net.readout(feats).argmax(dim=1), data.y_train)
        elif n_train_eval:
            pred = predict(net, sim, data.x_train[train_eval_idx], rows_per_call)
            train_acc = _accuracy(pred, data.y_train[train_eval_idx])
        else:
            train_acc = float("nan")
        extra: dict = {}
        if keeper is not None:  # selected on the twin; the device validates the selected weights once
            twin_acc, twin_loss = _val_figures(net, sim, data, rows_per_call, config.alpha)
            extra = {"val_accuracy_twin": twin_acc, "val_loss_twin": twin_loss, **keeper.metrics()}
            val_acc, val_loss, chosen = select_on_twin(
                selection, epoch, twin_acc, twin_loss, net.state_dict(), epoch >= config.epochs,
                net.load_state_dict, lambda: _val_figures(net, metered, data, rows_per_call, config.alpha))
            if epoch == start_epoch + 1 and state is None and keeper.calls:
                extra["twin_fit_calls"] = keeper.calls
        else:
            val_acc, val_loss = _val_figures(net, metered, data, rows_per_call, config.alpha)
            selection.offer(epoch, val_acc, val_loss, net.state_dict())
            chosen = selection.metrics()
        metrics = {
            "epoch": epoch,
            "loss": sum(block_losses) / len(block_losses),
            "train_accuracy": train_acc,  # on the twin in silico
            "val_accuracy": val_acc,  # measured on the device
            "val_loss": val_loss,  # cross-entropy of the class scores (alpha x summed goodness)
            **chosen,
            **extra,
            "device_calls": metered.calls - calls0,
            "device_rows": metered.rows - rows0,
            "device_calls_train": calls_train,
            "device_rows_train": rows_train,
            "epoch_s": time.monotonic() - t0,
            "n_physical_params": 0,  # theta is fixed: PhyLL trains only the digital layers
            "n_digital_params": sum(p.numel() for p in net.parameters()),
            # outputs the blocks do not read (`readout`; auto: those that never varied), a param of the run
            "dead_outputs": ",".join(map(str, sorted({j for b in net.blocks for j in b.dead()}))) or "none",
        }
        metrics.update({f"loss_block{b}": v for b, v in enumerate(block_losses)})
        final: dict = {}
        weights = net.state_dict()  # this epoch's: what a resume continues from (copied below)
        if epoch == config.epochs and config.final_test:  # the one pass over the test split
            final = final_pass(selection, net.load_state_dict,
                               lambda: predict(net, metered, data.x_test, rows_per_call), data.y_test)
            metrics.update({k: v for k, v in final.items() if k != "test_predictions"})
            # the epoch's device use includes its test pass
            metrics.update(device_calls=metered.calls - calls0, device_rows=metered.rows - rows0)
        history.append(metrics)
        state = training_state(net, optimizers, gen, history, epoch, selection, config, weights=weights,
                               **({"twins": [keeper.state()]} if keeper is not None else {}),
                               **({"test_predictions": final["test_predictions"]} if final else {}))
        if report is not None:
            report(dict(metrics), state)
    return result_of(history, selection, state, net)


# ----------------------------------------------------------------------------------------------------
# The trainer contract (trainers.registry)
# ----------------------------------------------------------------------------------------------------
def phyll_optimizers(net: PhyLLNet, config: PhyLLConfig) -> dict:
    """One optimiser per block ("block0", ...), and "readout" for the unsupervised readout."""
    out = {f"block{b}": make_optimizer(config.optimizer, block.parameters(), config.lr)
           for b, block in enumerate(net.blocks)}
    if net.readout is not None:
        out["readout"] = Adam(net.readout.parameters(), lr=config.readout_lr)
    return out


def phyll_lrs(config: PhyLLConfig) -> dict[str, float]:
    return {**{f"block{b}": config.lr for b in range(config.n_blocks)}, "readout": config.readout_lr}


def phyll_network(config: PhyLLConfig, device, shape) -> PhyLLNet:
    """The network of a PhyLL config on `device` (its fixed theta and calibration come with the
    weights of a checkpoint)."""
    return PhyLLNet(device.spec, config, shape.n_features, shape.n_classes, torch.Generator().manual_seed(config.seed),
                    shape.image_shape)


def phyll_predict(net: PhyLLNet, x: torch.Tensor, config: PhyLLConfig, device) -> torch.Tensor:
    return predict(net, device, x, max(1, min(device.spec.max_rows, config.eval_batch_size)))
