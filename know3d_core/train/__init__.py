"""Training (issue 19): ``know3d train know3d | trellis2 | backview``.

- ``config``: :class:`TrainConfig` (defaults = TRELLIS.2's released trainers).
- ``flow_matching``: the CFM formula, t schedules, condition dropout.
- ``dataset``: the prepared dataset as samples, checks, token-budget micro-batches.
- ``engine``: torchrun / DDP / FSDP2 loop, accumulation, EMA, clipping, checkpoints and resume.
- ``features``: cached DINOv3 conditions and Know3D knowledge per pair.
- ``flows``: the ``know3d`` and ``trellis2`` tasks; ``backview``: the back-view LoRA task and exports.
- ``logs``: progress bar, metrics CSV, TensorBoard, loss plot.
- ``commands``: the ``know3d train`` command line (torch-free at import).
"""
