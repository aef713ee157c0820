"""Models from the `model` and `tome` groups, timm and transformers (`build`); how much to merge (`tome_group`)."""
