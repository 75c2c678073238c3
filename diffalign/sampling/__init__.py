"""Sampling over any backbone and noise process: one guided loop (`sample`), its single step
(`denoise_step`), per-step trajectories with transition log-probabilities, and image conversion."""

from diffalign.sampling.loop import (
    SampleOutput,
    Trajectory,
    denoise_step,
    initial_noise,
    sample,
    sample_images,
    to_uint8,
    transition_log_prob,
)

__all__ = ["SampleOutput", "Trajectory", "denoise_step", "initial_noise", "sample", "sample_images", "to_uint8",
           "transition_log_prob"]  # fmt: skip
