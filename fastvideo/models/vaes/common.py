"""Pieces shared by the VAEs."""

import torch


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) of a KL-VAE, from encoder ``parameters`` that hold
    mean and logvar stacked along dim 1.

    Behaves like diffusers' ``DiagonalGaussianDistribution``: same logvar clamp, and
    ``sample`` draws the same noise for the same generator(s).
    """

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Clamped so exp() can neither underflow to a zero std nor overflow.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(
        self, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """``mean + std * eps``. A list of generators seeds each batch element separately."""
        noise = _randn(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise


def _randn(
    shape: torch.Size,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn like diffusers' ``randn_tensor``: on the generator's
    device (so a CPU generator gives the same numbers whatever ``device`` is), then moved."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        per_item = (1, *shape[1:])
        draws = [
            torch.randn(per_item, generator=g, device=g.device, dtype=dtype) for g in generator
        ]
        return torch.cat(draws).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
