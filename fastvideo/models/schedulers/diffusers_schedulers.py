"""Noise schedulers come from diffusers unchanged: they are small, exact, and shared with the
reference pipelines we are compared against."""

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

__all__ = ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]
