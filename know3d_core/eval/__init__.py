"""Evaluation: ``know3d eval`` (volume IoU, Chamfer distance, F-score, their back-half restrictions,
back-view normal-map PSNR / SSIM / LPIPS) and the small-scale Know3D experiment.

Modules: ``geometry`` (definitions of every geometric metric and the back half), ``images``
(normal-map metrics), ``lpips`` (LPIPS from user-supplied weights), ``evaluate`` (per item,
aggregation), ``items`` (reading --pred / --gt folders), ``report`` (eval.json / .csv / .png,
worst-items sheet), ``run`` (the whole evaluation), ``commands`` (the CLI, torch-free at import).
ULIP-2 / Uni3D image-to-shape similarity is not implemented: see ``docs`` hook in README
("Train your own Know3D", evaluation).
"""
