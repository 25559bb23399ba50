"""The layers of a bmojo model: the Mamba mixer, B'MOJO attention, the eidetic memory, and the
modules they share (norm, RoPE, MLP)."""
