"""Mixture-of-LoRAs linear layers: ReMix and the baselines it is compared with.

Legend: T = tokens (leading dims flattened), D = d_in, O = d_out, n = LoRAs in the pool,
k = LoRAs per token, r = rank.

    y = W x + sum_{j in J(x)} w_j(x) * B_j A_j x

The routers differ only in how they pick J and the weights w:
    remix         J ~ k draws without replacement from softmax(P x) (training) / top-k (eval); w = ω
    softmax-topk  J = top-k(softmax(P x)), w = renormalised probabilities (MixLoRA), + optional LB loss
    dense         J = all n, w = softmax(P x) (MoLoRA / HydraLoRA)
    lora          J = {0}, w = alpha / r (plain LoRA; rank r or k*r)
All of them delegate the arithmetic to the gather kernel and can record what they selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from remix import routing
from remix.config import MixtureConfig
from remix.kernels import cpu_ext, flatten_a, flatten_b_t, lora_gather, topk_masked_u


class MixtureOfLoRAsLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a pool of n LoRAs and (for routed kinds) a router ``P [n, D]``.

    Parameters: ``lora_A [n, r, D]`` (Kaiming-uniform), ``lora_B [n, O, r]`` (zeros, so a fresh
    adapter adds exactly nothing to the base layer's output - on CPU in eval mode the compiled call computes that
    output with the project's own GEMM, which rounds in another order than ATen's linear), ``router [n, D]``. Set
    ``record = True`` to accumulate ``usage`` (selections per LoRA) and, for learned-weight routers, the ESS of the
    routing weights. ``last_idx`` holds the last forward's selections; on the compiled CPU path it is one buffer the
    next forward overwrites (clone to keep).
    """

    kind = "abstract"
    routed = True  # has a router P (False for plain LoRA)

    def __init__(self, base: nn.Linear, config: MixtureConfig):
        super().__init__()
        config.validate()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.config = config
        self.in_features, self.out_features = base.in_features, base.out_features
        self.n, self.k, self.r = config.n, min(config.k, config.n), config.r
        self.omega = config.omega_value()
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.n, self.r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.n, self.out_features, self.r, **factory))
        self.router = nn.Parameter(torch.empty(self.n, self.in_features, **factory)) if self.routed else None
        self.reset_parameters()
        self.record = False
        self.register_buffer("usage", torch.zeros(self.n, dtype=torch.int64, device=factory["device"]), persistent=False)
        self.ess_sum, self.ess_tokens = 0.0, 0
        self.last_idx: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def reset_parameters(self) -> None:
        for i in range(self.n):  # per pool, as peft initialises one LoRA's A
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, n={self.n}, k={self.k}, r={self.r}, omega={self.omega:.4g}"

    # -- routing: subclasses return (idx [T, k] int64, weight: float | [T] | [T, k]) ------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [T, D]
        idx, weight = self.route(x2)
        self._record(idx, weight)
        A, B = self.lora_A, self.lora_B
        if A.dtype == x2.dtype:
            y = lora_gather(x2, A, B, idx, weight, out=self.base(x2))
        elif torch.is_grad_enabled():  # float32 pools around a bfloat16 base (training.fit --dtype bfloat16), training:
            # the pools cast to the base's dtype for the step, as autocast casts weights (their gradients come back
            # float32); float32 activations cost 2x the step here (their casts and float32 GEMMs)
            y = lora_gather(x2, A.to(x2.dtype), B.to(x2.dtype), idx, weight, out=self.base(x2))
        else:  # the same, evaluating: the delta in float32, added to the base's output and rounded once, as the
            y = lora_gather(x2.to(A.dtype), A, B, idx, weight, out=self.base(x2).to(A.dtype)).to(x2.dtype)  # server
        return y.view(*shape, self.out_features)

    def pools_to(self, dtype: torch.dtype) -> None:
        """Keep the trainable pools and router in ``dtype`` (float32 master weights around a bfloat16 base), whatever
        the base's dtype. The forward then casts them to the base's dtype while autograd records (training), and
        computes the delta in ``dtype`` and rounds the sum once where it does not (evaluation)."""
        for name in ("lora_A", "lora_B", "router"):
            p = self._parameters.get(name)
            if p is not None and p.dtype != dtype:
                self._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)

    def _record(self, idx: torch.Tensor, weight: torch.Tensor | float) -> None:
        # plain attributes: writing __dict__ skips nn.Module.__setattr__'s parameter/buffer checks (~8 us per call)
        self.__dict__["last_idx"] = idx.detach()
        self.__dict__["last_weights"] = weight.detach() if torch.is_tensor(weight) else None
        if self.record:
            valid = idx[idx >= 0]
            self.usage += torch.bincount(valid.flatten(), minlength=self.n)
            if torch.is_tensor(weight) and weight.dim() == 2:
                self.ess_sum += float(routing.ess(weight.detach()).sum())
                self.ess_tokens += weight.shape[0]

    def reset_stats(self) -> None:
        self.usage.zero_()
        self.ess_sum, self.ess_tokens = 0.0, 0

    def mean_ess(self) -> float:
        """Mean ESS of the routing weights since the last reset (k exactly for ReMix)."""
        if self.ess_tokens == 0:
            return float(self.k) if self.kind == "remix" else float("nan")
        return self.ess_sum / self.ess_tokens


class ReMixLinear(MixtureOfLoRAsLinear):
    """The ReMix layer (DESIGN §1): k LoRAs per token, each with the same constant weight ω.

    Training mode: every token draws its own ordered selection without replacement from
    q = softmax(P x) and the layer keeps ``last_log_q`` [*leading dims] = log Q(J) summed over
    its k draws, computed from ``P · stopgrad(x)`` so the RLOO surrogate reaches the router only.
    Evaluation: J = top-k(P x), ties to the lower index, and no log Q.
    """

    kind = "remix"

    def __init__(self, base: nn.Linear, config: MixtureConfig):
        super().__init__(base, config)
        self.sample: bool | None = None  # None: sample in training mode, top-k in eval mode
        self.noise = None  # optional callable(rows) -> uniform [rows, n]: the trainer's split-invariant draws
        self.last_log_q: torch.Tensor | None = None
        self._eval_cache: dict | None = None
        self._call = None  # compiled whole-module call (remix.kernels.cpu_ext.ModuleCall), bound by _inference_weights
        self._call_for: tuple = (None, None, None)  # cpu_ext.base_key of the base _call was bound to

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        sample = self.training if self.sample is None else self.sample
        logits = routing.router_logits(x.detach(), self.router)  # [T, n] float32
        if sample:
            uniform = self.noise(logits.shape[0]) if self.noise is not None else None
            idx, self.last_log_q = routing.sample_without_replacement(logits, self.k, uniform=uniform)
        else:
            idx, self.last_log_q = routing.topk_lower_index(logits, self.k), None
        return idx, self.omega

    def _bound(self, x: torch.Tensor) -> torch.Tensor | None:
        """The compiled whole-module call's output (None where it is not bound or does not apply: no usage recording,
        the base it was bound to, no autograd, weights unchanged, a CPU tensor)."""
        call = self._call
        if call is None or self.record or not cpu_ext.bound_applies(self._modules["base"], self._call_for):
            return None
        out = call(x)
        if out is None:
            return None
        d = self.__dict__  # plain attributes, no nn.Module.__setattr__
        d["last_idx"], d["last_weights"], d["last_log_q"] = out[1], None, None
        return out[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the compiled whole-module call, bound on the first top-k forward that can use it (else the general path binds)
        if self._call is not None and (self.sample is False or (self.sample is None and not self.training)):
            y = self._bound(x)
            if y is not None:
                return y
        sample = self.training if self.sample is None else self.sample
        if not sample and self._parameters["lora_A"].dtype == x.dtype:  # (pools of another dtype: the general path)
            params = self._parameters
            trainable = params["lora_A"].requires_grad or params["lora_B"].requires_grad or params["router"].requires_grad
            if not (trainable and torch.is_grad_enabled()):
                ext = cpu_ext.for_input(x)
                if ext is not None:
                    return self._forward_cpu(ext, x)
                if x.dtype == torch.float32:
                    return self._forward_inference(x)
        y = super().forward(x)
        if self.last_log_q is not None:
            self.last_log_q = self.last_log_q.view(x.shape[:-1])
        return y

    def _inference_weights(self) -> dict:
        """Float32 router, A_flat [n*r, D], B_flat^T [n*r, O] (float32, or bfloat16 for bfloat16 pools) and the
        kernel's one-slot tables and arguments, rebuilt only when a parameter (or the base's weight) changes; binds
        the compiled whole-module call (``_call``) when the base is a plain CPU ``nn.Linear``. The torch path adds its
        [P; A_flat] on first use."""
        params, base = self._parameters, self.base
        P, A, B = params["router"], params["lora_A"], params["lora_B"]
        key = (P.data_ptr(), P._version, A.data_ptr(), A._version, B.data_ptr(), B._version)
        cache = self._eval_cache
        base_params = (base._parameters.get("weight"), base._parameters.get("bias"))
        if cache is None or cache["key"] != key or any(p is not q for p, q in zip(cache["base_params"], base_params)):
            pool = cpu_ext.pool_dtype(A.dtype)  # the kernel's: bfloat16 pools stay bfloat16; the router is float32
            router, a = P.detach().float().contiguous(), flatten_a(A.detach()).to(pool).contiguous()
            bt = flatten_b_t(B.detach()).to(pool).contiguous()
            tables = (torch.zeros(1, dtype=torch.int64), torch.tensor([self.n]), torch.tensor([self.k]),
                      torch.tensor([self.omega], dtype=torch.float32))
            cache = self._eval_cache = {
                "key": key, "router": router, "a": a, "bt": bt, "base_params": base_params,
                "args": (router, a, bt, cpu_ext.NONE, *tables, self.r, self.k, cpu_ext.NONE),
            }
            self.__dict__["_call"] = cpu_ext.bind_module(base, router, a, bt, tables, self.r, self.k, watched=(P, A, B))
            self.__dict__["_call_for"] = cpu_ext.base_key(base)
        return cache

    def _forward_cpu(self, ext, x: torch.Tensor) -> torch.Tensor:
        """Top-k routing and the gather of the selected LoRAs only, in the compiled CPU kernel (the general form:
        a base with hooks or of another type runs as a module; the common case takes ``_call`` in ``forward``)."""
        w = self._inference_weights()
        y = self._bound(x)  # just bound where it applies: the first call computes what every later one will
        if y is not None:
            return y
        x2 = x.reshape(-1, self.in_features).contiguous()
        y = self.base(x2).contiguous()
        idx = ext.route_gather_(x2, y, *w["args"])
        self.__dict__["last_log_q"] = None
        self._record(idx, self.omega)
        return y.view(*x.shape[:-1], self.out_features)

    def _forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """Torch-ops path: the router and every A in one GEMM, mask to the top-k, one GEMM over every B."""
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        w = self._inference_weights()
        if "pa" not in w:
            w["pa"], w["bt32"] = torch.cat([w["router"], w["a"].float()], 0), w["bt"].float()
        pu = F.linear(x2, w["pa"])  # [T, n + n*r]: router logits, then every pool's A x
        um, idx = topk_masked_u(pu, self.n, self.k, self.omega)  # [T, n*r] selected chunks scaled by ω
        self.last_log_q = None
        self._record(idx, self.omega)
        y = torch.addmm(self.base(x2), um, w["bt32"])
        return y.view(*shape, self.out_features)


class SoftmaxTopkLinear(MixtureOfLoRAsLinear):
    """MixLoRA-style router: top-k of softmax(P x) with renormalised, learned weights.

    With ``load_balance_coef > 0`` it keeps ``aux_loss`` = n · Σ_i f_i · p̄_i (Mixtral/Switch), where
    f_i is the share of the T·k selections that went to LoRA i and p̄_i its mean probability.
    """

    kind = "softmax-topk"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = routing.router_probs(routing.router_logits(x, self.router))  # [T, n]
        idx = routing.topk_lower_index(probs.detach(), self.k)
        top = probs.gather(1, idx)
        weight = top / top.sum(-1, keepdim=True) * self.omega  # [T, k]
        self.aux_loss = None
        if self.config.load_balance_coef > 0 and self.training:
            frac = torch.bincount(idx.flatten(), minlength=self.n).float() / idx.numel()
            self.aux_loss = self.n * (frac * probs.mean(0)).sum()
        return idx, weight


class DenseSoftmaxLinear(MixtureOfLoRAsLinear):
    """MoLoRA / HydraLoRA-style router: every LoRA, weighted by softmax(P x)."""

    kind = "dense"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = routing.router_probs(routing.router_logits(x, self.router))  # [T, n]
        idx = torch.arange(self.n, device=x.device).expand(x.shape[0], self.n)
        return idx, probs * self.omega


class LoRALinear(MixtureOfLoRAsLinear):
    """Plain LoRA (n = 1, no router): y = W x + (alpha / r) B A x. Use r = k·r for the rank-kr baseline."""

    kind = "lora"
    routed = False

    def __init__(self, base: nn.Linear, config: MixtureConfig):
        super().__init__(base, config)
        self.k = 1

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        return torch.zeros(x.shape[0], 1, dtype=torch.int64, device=x.device), self.omega


LAYERS: dict[str, type[MixtureOfLoRAsLinear]] = {
    cls.kind: cls for cls in (ReMixLinear, SoftmaxTopkLinear, DenseSoftmaxLinear, LoRALinear)
}


def make_layer(base: nn.Linear, config: MixtureConfig) -> MixtureOfLoRAsLinear:
    """Wrap ``base`` with the layer of ``config.router``."""
    return LAYERS[config.router](base, config)
