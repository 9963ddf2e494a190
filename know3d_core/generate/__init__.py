"""The generation commands of ``know3d`` (generate, batch, models, demo): arguments, commands, outputs."""
