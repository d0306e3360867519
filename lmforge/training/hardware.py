"""What this machine can run: train's hardware settings checked before any work, and the precision
``auto`` resolves to. Used by stages/train.py; imports torch and Lightning only when called.
"""

from __future__ import annotations

from collections.abc import Collection

from lmforge.common import UserError
from lmforge.params import Train, parse_devices


def resolve_precision(precision: str, accelerator: str, cuda: bool, bf16: bool) -> str:
    """``auto``: bf16-mixed on a GPU with fast bf16, else fp32 (CPU autocast gains nothing)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if cuda and bf16 and accelerator in ("auto", "gpu", "cuda") else "32-true"


def check_hardware(
    train: Train, cuda_available: bool, bf16_supported: bool, gpu_count: int,
    strategies: Collection[str] = (),
) -> list[str]:
    """Every train setting this machine cannot run (empty: all fine), each naming its key.

    Lightning refuses some of these only when the Trainer is built (after the model is loaded and
    the MLflow run opened) and silently changes others: ``16-mixed`` on a CPU becomes bf16-mixed.
    ``strategies``: the names Lightning knows (empty: not checked).
    """
    problems = []
    wants_gpu = train.accelerator in ("gpu", "cuda")
    on_gpu = cuda_available and train.accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and not cuda_available:
        problems.append(f"train.accelerator: '{train.accelerator}' but no CUDA GPU is visible "
                        "(use auto or cpu)")
    precision, where = train.precision, "a GPU" if on_gpu else "a CPU"
    if precision.startswith("bf16") and on_gpu and not bf16_supported:
        problems.append(f"train.precision: '{precision}' needs bfloat16, which this GPU lacks "
                        "(before Ampere): use 16-mixed or 32-true")
    if not on_gpu and not wants_gpu and precision in ("16-mixed", "16"):
        problems.append(f"train.precision: '{precision}' on a CPU: Lightning would silently train "
                        "in bf16-mixed instead; use bf16-mixed or 32-true")
    if not on_gpu and not wants_gpu and precision.startswith("transformer-engine"):
        problems.append(f"train.precision: '{precision}' needs an NVIDIA GPU")
    problems += _device_problems(train.devices, on_gpu, gpu_count)
    strategy = train.strategy
    if strategies and strategy != "auto" and strategy not in strategies:
        problems.append(f"train.strategy: '{strategy}' is not a Lightning strategy; e.g. auto, ddp, "
                        "fsdp, deepspeed")
    elif strategy.startswith(("fsdp", "deepspeed")) and not on_gpu:
        problems.append(f"train.strategy: '{strategy}' shards a model across GPUs; on {where} use "
                        "auto or ddp")
    return problems


def _device_problems(devices: int | str, on_gpu: bool, gpu_count: int) -> list[str]:
    wanted = parse_devices(devices)
    if on_gpu and isinstance(wanted, int) and wanted > gpu_count:
        return [f"train.devices: {wanted} GPUs asked for, {gpu_count} visible"]
    if on_gpu and isinstance(wanted, list) and max(wanted) >= gpu_count:
        return [f"train.devices: GPU ids {wanted} asked for, visible ids are 0..{gpu_count - 1}"]
    if not on_gpu and isinstance(wanted, list):
        return [f"train.devices: GPU ids {wanted} on a CPU; use a process count or auto"]
    return []


def require_hardware(train: Train) -> None:
    """Refuse, listing every problem, train settings this machine cannot run: before any work."""
    import torch
    from lightning.pytorch.strategies import StrategyRegistry

    cuda = torch.cuda.is_available()
    problems = check_hardware(
        train, cuda, cuda and torch.cuda.is_bf16_supported(),
        torch.cuda.device_count() if cuda else 0, StrategyRegistry.available_strategies())
    if problems:
        raise UserError(f"params train section: {len(problems)} problem(s) on this machine:\n"
                        + "\n".join(f"  - {p}" for p in problems))
