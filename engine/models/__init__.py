"""Models built from the `model` and `tome` config groups, timm and transformers (`build`); how much to merge
(`tome_group`)."""
