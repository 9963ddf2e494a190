"""Know3D training data: a folder of 3D assets -> renders, front/back pairs, annotations, O-Voxels
and TRELLIS.2 latents (``know3d data ...``). ``layout`` is the on-disk contract every part imports."""
