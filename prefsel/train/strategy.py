"""Distributed strategies (--strategy): the ONE DeepSpeed config builder, and the two engines.

An :class:`Engine` is what the worker loop trains with: the module, its optimizer and LR
schedule behind one small interface. `make_engine(cfg, ...)` picks :class:`DeepSpeedEngine`
(--strategy deepspeed, ZeRO 0-3) or :class:`DDPEngine` (--strategy ddp).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Protocol

import torch


class Engine(Protocol):
    """The interface the loop uses; save / load / full_state_dict are collective (every rank calls)."""

    module: torch.nn.Module  # the wrapped LogpModule / RewardModule (unwrapped from DDP / DeepSpeed)
    lr: float  # current learning rate

    def __call__(self, *inputs): ...  # forward through the wrapped module

    def accumulate(self, boundary: bool): ...  # context for one micro-batch (DDP: no_sync off the boundary)

    def backward_step(self, loss: torch.Tensor, boundary: bool) -> float | None: ...  # grad norm at the boundary

    def train(self) -> None: ...

    def eval(self) -> None: ...

    def save(self, path: str, state: dict) -> None: ...  # weights, optimizer, scheduler + `state`

    def load(self, path: str) -> dict: ...  # restores them; returns `state`

    def full_state_dict(self) -> dict | None: ...  # full (ZeRO-3: gathered) weights on rank 0, else None


# ---- device and process-group backend: decided where the worker runs ------------------------
#
# A worker that asked for a GPU (--use-gpu) normally sees CUDA: it trains on its CUDA device over
# NCCL. One that got a GPU *resource* but finds no CUDA (a simulated GPU node of
# prefsel/cluster_sim.py, or CPU-only torch) trains on the CPU over gloo, rather than failing in
# NCCL. The choice is made in the workers, not from the resources asked for on the driver.


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: Ray Train's CUDA device when it asked for a GPU and CUDA is there,
    else the CPU."""
    if use_gpu and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def dist_backend(cuda: bool | None = None) -> str:
    """The torch.distributed backend for a process with (cuda=True) or without CUDA (None: this
    process's): nccl on CUDA, gloo otherwise."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return "nccl" if cuda else "gloo"


def process_group_backend(device: torch.device | None = None) -> str:
    """The backend of the process group Ray Train set up (DeepSpeed's comm must use the same);
    when there is none yet, the one for `device` (None: for this process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return str(dist.get_backend())
    return dist_backend(None if device is None else device.type == "cuda")


def backend_for_workers(sees_cuda: list[bool]) -> str:
    """One backend for a worker group, from whether each worker sees CUDA: nccl if all do, gloo if
    none does; a mix (some nodes without CUDA) is refused: DDP / ZeRO need one kind of device."""
    if sees_cuda and all(sees_cuda):
        return dist_backend(True)
    if not any(sees_cuda):
        return dist_backend(False)
    raise RuntimeError(
        f"{sum(sees_cuda)} of {len(sees_cuda)} training workers see CUDA: every worker must see a GPU, or none"
    )


def deepspeed_config(cfg) -> dict:
    """DeepSpeed config for ZeRO stage 0/1/2/3 with optional optimizer / parameter offload."""
    zero: dict = {
        "stage": cfg.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
        "allgather_bucket_size": 5e8,
    }
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_param_persistence_threshold"] = 1e4
        if cfg.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(cfg.use_gpu)}
    out = {
        "train_batch_size": cfg.train_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_train_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(cfg.bf16)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.max_norm > 0:
        out["gradient_clipping"] = cfg.max_norm
    if cfg.bf16:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out


def lr_lambda(cfg, total_steps: int):
    """Linear warmup, then constant / linear to 0 / cosine to min_lr_ratio (cosine with
    min_lr_ratio is OpenRLHF's default schedule). Warmup step s (0-based) runs at (s+1)/(w+1) of
    the rate, never at 0 (HF's s/w spends its first step on a zero rate); both reach the full
    rate at step w. The decay's end is the step after the last, so the last step's rate is a
    little above its floor, as in HF's schedulers."""
    warmup = math.ceil(cfg.lr_warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.lr_scheduler == "linear":
            return 1.0 - frac
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices decay, vectors (biases, norm scales) do not, as in
    OpenRLHF's and HF Trainer's optimizers; decaying a norm's scale pulls it to 0, not to the
    identity. One group when nothing decays."""
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    # under ZeRO-3 (zero.Init) a parameter is an empty shard; ds_shape is its real shape
    matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    decay = [p for p, m in zip(params, matrix) if m]
    keep = [p for p, m in zip(params, matrix) if not m]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(cfg, params, device: torch.device):
    params = decay_groups(list(params), cfg.weight_decay)
    if cfg.strategy == "deepspeed" and cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                weight_decay=cfg.weight_decay, adamw_mode=True)
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                             weight_decay=cfg.weight_decay, **kw)


class _EngineBase:
    """What both engines share: the learning rate read from the optimizer, and train/eval modes
    set on `self._modes` (the DeepSpeed engine, or the plain module)."""

    optimizer: torch.optim.Optimizer
    _modes: torch.nn.Module

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self):
        self._modes.train()

    def eval(self):
        self._modes.eval()


class DeepSpeedEngine(_EngineBase):
    """DeepSpeed ZeRO (stage 0-3, optional CPU offload): accumulation, clipping and scheduling
    are DeepSpeed's, from deepspeed_config(cfg)."""

    def __init__(self, cfg, module: torch.nn.Module, total_steps: int, device: torch.device) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend=process_group_backend(device))
        params = [p for p in module.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg),
            dist_init_required=False,
        )
        self._modes = self.ds
        self.cfg = cfg

    def __call__(self, *args):
        return self.ds(*args)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def accumulate(self, boundary: bool):
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, boundary: bool):
        self.ds.backward(loss)
        norm = None
        if boundary and self.cfg.zero_stage == 0:
            # without ZeRO, DeepSpeed keeps no norm for a torch optimizer (get_global_grad_norm is
            # None): the gradients, all-reduced by backward at the boundary, give it before clipping
            grads = [p.grad for p in self.ds.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else None
        self.ds.step()  # DeepSpeed steps the optimizer + scheduler only at the boundary
        if boundary:
            norm = self.ds.get_global_grad_norm() if norm is None else norm
            return float(norm) if norm is not None else float("nan")
        return None


    def save(self, path: str, state: dict) -> None:
        self.ds.save_checkpoint(path, tag="state", client_state=state)

    def load(self, path: str) -> dict:
        _, client = self.ds.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {path}")
        return client

    def full_state_dict(self) -> dict | None:
        """Full weights (ZeRO-3: gathered); a dict on rank 0, None elsewhere. Collective."""
        import torch.distributed as dist

        if self.cfg.zero_stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.ds.module.state_dict()
        return sd if (not dist.is_initialized() or dist.get_rank() == 0) else None


class DDPEngine(_EngineBase):
    """Plain torch DistributedDataParallel with manual accumulation, clipping and scheduling."""

    def __init__(self, cfg, module: torch.nn.Module, total_steps: int, device: torch.device) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.cfg = cfg
        module.to(device)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            self.wrapped = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.wrapped = module
        self._module = self._modes = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.autocast = cfg.bf16
        self.device = device  # the inputs are TokenBatches, not tensors: autocast on the module's device

    def __call__(self, *args):
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.wrapped(*args)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def accumulate(self, boundary: bool):
        if self.distributed and not boundary:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, boundary: bool):
        (loss / self.cfg.grad_accum).backward()
        if not boundary:
            return None
        if self.cfg.max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


    def save(self, path: str, state: dict) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        os.makedirs(path, exist_ok=True)
        torch.save(
            {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict(),
             "scheduler": self.scheduler.state_dict(), "client": state},
            os.path.join(path, "ddp_state.pt"),
        )

    def load(self, path: str) -> dict:
        blob = torch.load(os.path.join(path, "ddp_state.pt"), map_location="cpu", weights_only=False)
        self._module.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        return blob["client"]

    def full_state_dict(self) -> dict | None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return self._module.state_dict()


def make_engine(cfg, module: torch.nn.Module, total_steps: int, device: torch.device) -> Engine:
    """The --strategy's engine around `module` (total_steps: the LR schedule's length)."""
    if cfg.strategy == "deepspeed":
        return DeepSpeedEngine(cfg, module, total_steps, device)
    return DDPEngine(cfg, module, total_steps, device)
