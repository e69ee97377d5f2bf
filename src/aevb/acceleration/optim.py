"""The optimiser of the training loop: torch's fused Adam, with less Python per step.

``torch.optim.Adam(fused=True)`` runs one kernel per step, but around it
``Optimizer.step`` rebuilds six lists of tensors, groups them by device and
dtype and checks every parameter's state: about 0.11 ms of Python per step
for the MLP VAE, a twentieth of its whole step on a 2-core CPU
(``bench/README.md``).  :class:`Adam` keeps those lists from one step to the
next and calls the same kernel with the same arguments, so the updates are
bit for bit those of ``torch.optim.Adam(fused=True)`` (checked in
``tests/test_optim.py``).  It is a ``torch.optim.Adam``: its ``state_dict``,
``param_groups``, learning-rate schedulers and step hooks are torch's own.

Wherever the lean step does not apply (the first step, which creates the
state; a parameter without a gradient; amsgrad, a tensor learning rate, a
grad scaler, parameters on several devices or of several dtypes; a closure),
``step`` is torch's.
"""

from __future__ import annotations

import torch
from torch.optim import optimizer as torch_optimizer


class Adam(torch.optim.Adam):
    """``torch.optim.Adam(params, fused=True, **kwargs)`` whose steady-state ``step`` skips torch's bookkeeping."""

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self._lean: list[tuple[list, list, list, list]] | None = None  # per group: params, m, v, steps

    # the cached lists hold the state's tensors: any change of the state or the groups drops them
    def load_state_dict(self, state_dict) -> None:
        self._lean = None
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self._lean = None
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none=False)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _lean_lists(self) -> list[tuple[list, list, list, list]] | None:
        """The cached tensor lists per group, or None where torch's own step must run."""
        # read every step: a GradScaler sets grad_scale / found_inf around each step, a user may change a group
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return None
        for group in self.param_groups:
            if (group.get("amsgrad") or group.get("differentiable") or group.get("capturable")
                    or not group.get("fused") or group.get("decoupled_weight_decay") or torch.is_tensor(group["lr"])):
                return None
        if self._lean is not None:
            return self._lean
        params = [p for group in self.param_groups for p in group["params"]]
        if not params or len({(p.device, p.dtype) for p in params}) != 1 or params[0].is_complex():
            return None
        lean = []
        for group in self.param_groups:
            states = [self.state.get(p) for p in group["params"]]
            if any(not state or "exp_avg" not in state for state in states):
                return None  # before the first step: torch creates the state
            lean.append((list(group["params"]), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                         [s["step"] for s in states]))
        self._lean = lean
        return lean

    def _has_hooks(self) -> bool:
        return bool(getattr(self, "_optimizer_step_pre_hooks", None) or getattr(self, "_optimizer_step_post_hooks", None)
                    or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
                    or getattr(torch_optimizer, "_global_optimizer_post_hooks", None))

    def step(self, closure=None):
        lean = None if closure is not None or self._has_hooks() else self._lean_lists()
        grads = None if lean is None else [[p.grad for p in params] for params, *_ in lean]
        if grads is None or any(g is None for group in grads for g in group):
            return _TORCH_STEP(self, closure)
        with torch.no_grad():
            for group, (params, exp_avgs, exp_avg_sqs, steps), group_grads in zip(self.param_groups, lean, grads):
                beta1, beta2 = group["betas"]
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(params, group_grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                   lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                                   eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
        return None

    # Optimizer.__init__ wraps a class's step in a function that runs the step hooks inside a profiler
    # range (about 45 µs a call); this one runs torch's wrapped step whenever there is a hook to run.
    step.hooked = True


# torch's Adam.step with its hook wrapper, for every step the lean one does not take
_UNWRAPPED_STEP = getattr(torch.optim.Adam.step, "__wrapped__", torch.optim.Adam.step)
_TORCH_STEP = (torch.optim.Optimizer.profile_hook_step(_UNWRAPPED_STEP)
               if hasattr(torch.optim.Optimizer, "profile_hook_step") else _UNWRAPPED_STEP)
