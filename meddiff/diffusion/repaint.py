"""RePaint (Lugmayr et al., CVPR 2022): inpainting with an unconditional diffusion model, as a sampling hook.

After every reverse step the known region is replaced by the known image noised to the step's level, so
the model only fills the unknown region, in harmony with what it sees around it. Resampling jumps: every
``jump`` steps the image is noised back ``jump`` steps and those steps run again, ``resample - 1`` times,
which lets the filled region and its surroundings agree. The plan of steps is the paper's (and diffusers'
``RePaintScheduler``): ``jump`` = its ``jump_length``, ``resample`` = its ``jump_n_sample``. Any diffusers
sampler that computes a step from its timestep alone runs it (DDPM, as in the paper, or DDIM); multistep
solvers keep a history that going back in time would corrupt.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from meddiff.diffusion.objective import noised, renoised

RESAMPLABLE = ("ddpm", "ddim")  # the samplers whose step depends on its timestep alone


def repaint_plan(steps: int, jump: int, resample: int) -> list[int]:
    """The order in which the ``steps`` reverse steps run, by index (0 = the noisiest): each index of a
    jump point is followed by the ``jump`` indices before it again, ``resample - 1`` times."""
    left = {remaining: resample - 1 for remaining in range(0, steps - jump, jump)}
    plan, index = [], 0
    while index < steps:
        plan.append(index)
        remaining = steps - (index + 1)
        if left.get(remaining, 0) > 0:
            left[remaining] -= 1
            index += 1 - jump
        else:
            index += 1
    return plan


class RePaint:
    """The hook: ``known`` (the image in model units, the batch's shape) is kept where ``keep`` is true.

    ``sampler`` has had ``set_timesteps(steps)``; pass ``timesteps`` (the plan) to ``sample_loop``.
    ``generator`` (one per item) draws the noise of the known region and of the jumps.
    """

    def __init__(self, known: torch.Tensor, keep: torch.Tensor, sampler: SchedulerMixin, jump: int, resample: int,
                 generator: torch.Generator | list[torch.Generator] | None = None):
        self.known, self.keep, self.generator = known, keep.to(torch.bool), generator
        steps = len(sampler.timesteps)
        self.plan = self.plan_for(steps, jump, resample)
        self.timesteps = [sampler.timesteps[i] for i in self.plan]
        abar = sampler.alphas_cumprod
        # abar of the level each step leaves x at; 1 for the clean image after the last step
        self.after = [float(abar[sampler.timesteps[i + 1]]) if i + 1 < steps else 1.0 for i in range(steps)]
        self.before = [float(abar[t]) for t in sampler.timesteps]

    @staticmethod
    def plan_for(steps: int, jump: int, resample: int) -> list[int]:
        """The plan for ``steps`` reverse steps; a jump longer than the steps is the whole run."""
        return repaint_plan(steps, min(jump, steps), resample)

    def _noise(self) -> torch.Tensor:
        return randn_tensor(self.known.shape, generator=self.generator, device=self.known.device,
                            dtype=self.known.dtype)

    def __call__(self, position: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        index = self.plan[position]
        level = self.after[index]
        known = self.known if level == 1.0 else noised(self.known, self._noise(), level)
        x = torch.where(self.keep, known, x)
        following = self.plan[position + 1] if position + 1 < len(self.plan) else None
        if following is not None and following <= index:  # a jump back: noise x up to the level that step starts from
            x = renoised(x, self._noise(), level, self.before[following])
        return x
