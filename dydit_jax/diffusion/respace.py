"""Timestep respacing (facebookresearch/DiT ``diffusion/respace.py`` semantics), in JAX."""
import jax.numpy as jnp
import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The set of original timesteps to keep.

    :param num_timesteps: number of steps of the original process.
    :param section_counts: a list of ints, or a string of comma-separated ints: the original
        steps are cut into len(section_counts) (nearly) equal sections and section i is
        strided to section_counts[i] steps (fractional stride, Python ``round``). The string
        ``"ddimN"`` instead takes the integer stride that gives exactly N steps (DDIM paper).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))  # Python round: half to even
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only ``use_timesteps`` of a base process.

    Its betas are recomputed from the base alphas_cumprod of the kept steps, so that the kept
    steps have the same alphas_cumprod. Methods take step indices 0..len(use_timesteps)-1 and
    the model is called with ``timestep_map[t]`` (the original timesteps).

    :param use_timesteps: collection of original timesteps to keep.
    :param kwargs: the :class:`GaussianDiffusion` arguments of the base process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        last_alpha_cumprod = 1.0
        new_betas = []
        timestep_map = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        self._timestep_map = np.asarray(timestep_map, dtype=np.int64)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)

    @property
    def timestep_map(self):
        return self._timestep_map

    def model_timesteps(self, t):
        table = jnp.asarray(self._timestep_map.astype(np.int32))
        return table[jnp.asarray(t)]
