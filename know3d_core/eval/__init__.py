"""Evaluation: ``know3d eval`` (volume IoU, Chamfer distance, F-score, their back-half restrictions,
back-view normal-map PSNR / SSIM / LPIPS) and the small-scale Know3D experiment.

Modules: ``geometry`` (definitions of every geometric metric and the back half), ``images``
(normal-map metrics), ``lpips`` (LPIPS from user-supplied weights), ``evaluate`` (per item,
aggregation), ``items`` (reading --pred / --gt folders), ``report`` (eval.json / .csv / .png,
worst-items sheet), ``run`` (the whole evaluation), ``commands`` (the CLI, torch-free at import),
``similarity`` (Uni3D / ULIP-2 image-to-shape similarity columns), ``uni3d`` / ``eva`` (the Uni3D
point encoder and its OpenCLIP EVA02-E image tower), ``ulip2`` / ``clip_vit`` (the ULIP-2 PointBERT
encoder and its OpenCLIP ViT-bigG image tower), all loaded strictly from the published checkpoints,
``weights`` (reading and checking user-supplied checkpoints).
"""
