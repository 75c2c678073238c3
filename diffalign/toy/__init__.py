"""The toy text-to-image world: renderer + prompt grammar (`world`), programmatic reward (`reward`,
scorer "toy"), frozen tiny text encoder (`text`), pixel-space denoiser + sampler (`model`).

Submodules are imported on use; `import diffalign.toy.reward` registers the "toy" scorer."""
