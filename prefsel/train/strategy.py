"""Distributed strategies: the ONE DeepSpeed config builder, and DeepSpeed / DDP engines.

Both engines expose the same small interface used by the loop:

    engine(*inputs)            forward through the wrapped module
    engine.accumulate(boundary) context for one micro-batch (DDP: no_sync off the boundary)
    engine.backward_step(loss, boundary) -> grad norm at the boundary (after clipping's input), else None
    engine.lr                  current learning rate
    engine.save(dir, state) / engine.load(dir) -> state     (collective; every rank calls)
    engine.full_state_dict()   full (gathered) weights on rank 0, for save_pretrained
"""

from __future__ import annotations

import contextlib
import math
import os

import torch


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
    """Linear warmup, then constant / linear to 0 / cosine to min_lr_ratio (OpenRLHF default)."""
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


def make_optimizer(cfg, params, device: torch.device):
    if cfg.strategy == "deepspeed" and cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                weight_decay=cfg.weight_decay, adamw_mode=True)
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                             weight_decay=cfg.weight_decay, **kw)


class DeepSpeedStrategy:
    def __init__(self, cfg, module: torch.nn.Module, total_steps: int, device: torch.device) -> None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        params = [p for p in module.parameters() if p.requires_grad]
        opt = make_optimizer(cfg, params, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg),
            dist_init_required=False,
        )
        self.cfg = cfg

    def __call__(self, *args):
        return self.engine(*args)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def accumulate(self, boundary: bool):
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor, boundary: bool):
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed steps the optimizer + scheduler only at the boundary
        if boundary:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        return None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self):
        self.engine.train()

    def eval(self):
        self.engine.eval()

    def save(self, path: str, state: dict) -> None:
        self.engine.save_checkpoint(path, tag="state", client_state=state)

    def load(self, path: str) -> dict:
        _, client = self.engine.load_checkpoint(path, tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"no DeepSpeed checkpoint under {path}")
        return client

    def full_state_dict(self) -> dict | None:
        """Full weights (ZeRO-3: gathered); a dict on rank 0, None elsewhere. Collective."""
        import torch.distributed as dist

        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict()
        return sd if (not dist.is_initialized() or dist.get_rank() == 0) else None


class DDPStrategy:
    """Plain torch DistributedDataParallel with manual accumulation, clipping and scheduling."""

    def __init__(self, cfg, module: torch.nn.Module, total_steps: int, device: torch.device) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.cfg = cfg
        module.to(device)
        self.distributed = dist.is_initialized() and dist.get_world_size() > 1
        if self.distributed:
            self.engine = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            self.engine = module
        self._module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(cfg, self.params, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.autocast = cfg.bf16

    def __call__(self, *args):
        ctx = torch.autocast(args[0].device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.engine(*args)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def accumulate(self, boundary: bool):
        if self.distributed and not boundary:
            return self.engine.no_sync()
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

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train(self):
        self._module.train()

    def eval(self):
        self._module.eval()

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


def make_strategy(cfg, module, total_steps: int, device: torch.device):
    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(cfg, module, total_steps, device)
    return DDPStrategy(cfg, module, total_steps, device)
