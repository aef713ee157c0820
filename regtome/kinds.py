"""Token kinds: what each token of the sequence is, carried through the merges in a (B, T) tensor."""

PATCH, REGISTER, CLASS = 0, 1, 2  # CLASS covers class and distillation tokens
