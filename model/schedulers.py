"""Samplers a user can pick per pipeline: ``ddim`` (AnimateDiff's, the default), ``dpm++``
(DPM-Solver++ multistep, 2nd order: the same quality in fewer steps) and ``lcm`` (for
AnimateLCM-type weights distilled for 4-8 steps). All come from diffusers and keep the base
scheduler's training configuration (betas, prediction type, timestep spacing)."""
from __future__ import annotations

SCHEDULERS = ("ddim", "dpm++", "lcm")


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        # the final step in first order: recommended by diffusers for few-step sampling
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       lower_order_final=True)
    if name == "lcm":
        return LCMScheduler.from_config(config)
    raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")


def use_scheduler(pipe, name: str | None):
    """Switch ``pipe`` to scheduler ``name`` (None: keep it); returns ``pipe``."""
    if name:
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        pipe.scheduler_name = name
    return pipe
