"""Syn-Pic-style ranked preference data: prompts x k generators x n scorers -> phi -> sharded parquet.

`load_config` + `run` (diffalign.synpic.run) do a whole run; `soft_preference` / `ranks_from_phi`
(diffalign.data.phi, shared with the data loader) are the math;
`Generator` and its adapters live in diffalign.synpic.generators."""
