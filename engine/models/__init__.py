"""Models built from the `model` and `tome` config groups: timm (`build`) and transformers (`transformers`)."""
