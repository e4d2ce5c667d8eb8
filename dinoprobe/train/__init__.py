"""Stage 2, arrays -> heads: one engine trains N >= 1 heads side by side on one stream of mini-batches.
`config` (the one declaration of a head's recipe), `heads`, `losses`, `stacked` (the heads' parameters and closed-form
gradients), `update` (schedule and optimiser), `sources` (where mini-batches come from), `loop`."""
