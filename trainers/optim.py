"""Optimisers and learning-rate schedules shared by the trainers.

Adam and SGD with momentum are written out here instead of taken from `torch.optim`: constructing any
`torch.optim.Optimizer` imports `torch._dynamo` (about 1.3 s of CPU, and more on a loaded machine), which
every trial of a sweep would pay on its first step for nothing, since nothing here is compiled. The
update rules are torch's own single-tensor ones, term for term (tests/test_optim.py is the oracle: the
same parameters as torch.optim after many steps), and `state_dict()` has torch's layout, so checkpoints
written with torch's optimisers load into these and the other way round.
"""
from __future__ import annotations

import math

import torch


class _Optimizer:
    """What the trainers use of an optimiser: `param_groups` (one group; its "lr" is read and set per
    epoch), `zero_grad`, `step`, `state_dict`, `load_state_dict`."""

    defaults: dict = {}

    def __init__(self, params, lr: float, **options):
        self.params = [p for p in params]
        self.param_groups = [{"lr": float(lr), **self.defaults, **options, "params": self.params}]
        self.state: dict[int, dict[str, torch.Tensor]] = {}  # per parameter index, as in torch's state_dict

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {i: dict(s) for i, s in self.state.items()},
                "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, saved: dict) -> None:
        groups = saved.get("param_groups") or []
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise ValueError(f"optimiser state for {[len(g.get('params', [])) for g in groups]} parameters "
                             f"in {len(groups)} group(s) does not fit this one ({len(self.params)} parameters, "
                             f"one group): the checkpoint was saved by another network; start afresh")
        order = groups[0]["params"]  # torch numbers the parameters; keys of "state" are those numbers
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.state = {}
        for pos, key in enumerate(order):
            entry = saved["state"].get(key, saved["state"].get(str(key)))
            if entry is not None:
                p = self.params[pos]
                self.state[pos] = {k: (v.to(p.dtype) if k != "step" else v.to(torch.float32)).clone()
                                   if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                                   for k, v in entry.items()}

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p, p.grad, group)

    def _update(self, i: int, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class Adam(_Optimizer):
    """torch.optim.Adam's rule (no weight decay, no amsgrad): moments by lerp and addcmul, bias
    corrections from the step count, update p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""

    defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "maximize": False}

    def _update(self, i, p, grad, group) -> None:
        st = self.state.get(i)
        if st is None:
            st = self.state[i] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
        beta1, beta2 = group["betas"]
        st["step"] += 1
        t = float(st["step"])
        st["exp_avg"].lerp_(grad, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] / (1 - beta1 ** t)
        denom = (st["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-step_size)


class SGD(_Optimizer):
    """torch.optim.SGD's rule with momentum (no dampening, not Nesterov): b = grad at the first step,
    then b = momentum * b + grad; p -= lr * b."""

    defaults = {"momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False}

    def _update(self, i, p, grad, group) -> None:
        st = self.state.get(i)
        if st is None:
            self.state[i] = {"momentum_buffer": grad.detach().clone()}
        else:
            st["momentum_buffer"].mul_(group["momentum"]).add_(grad)
        p.add_(self.state[i]["momentum_buffer"], alpha=-group["lr"])


def make_optimizer(name: str, params, lr: float) -> _Optimizer:
    """Adam, or SGD with momentum 0.9."""
    if name == "adam":
        return Adam(params, lr=lr)
    return SGD(params, lr=lr)


def cosine_lr(base: float, low: float, step: int, steps: int) -> float:
    """Cosine annealing from `base` at step 0 to `low` at `steps` (torch's CosineAnnealingLR, closed form)."""
    frac = min(step, steps) / max(1, steps)
    return low + 0.5 * (base - low) * (1 + math.cos(math.pi * frac))


def epoch_lr(config, epoch: int) -> float:
    """The learning rate of `epoch` (1-based): constant, or cosine from lr down to lr/20."""
    if getattr(config, "lr_schedule", "constant") != "cosine" or config.epochs <= 1:
        return config.lr
    return cosine_lr(config.lr, config.lr / 20, epoch - 1, config.epochs - 1)
