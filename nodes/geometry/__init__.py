"""Model-free 3D maths for text-to-3D: cameras, a voxel field, a volume renderer, meshes (the nodes are in
:mod:`nodes.three_d`).

Conventions
-----------
* **World.** The field fills the cube ``[-1, 1]^3``; ``+y`` is up. Distances (camera ``distance``) are in
  these units.
* **Field.** A tensor ``(4, R, R, R)`` of raw parameters laid out ``(channel, z, y, x)`` (what
  ``grid_sample`` reads with ``align_corners=True``, so grid node ``k`` sits at ``-1 + 2k / (R - 1)``).
  Channel 0 is density before ``softplus`` (extinction per world unit), channels 1-3 colour before
  ``sigmoid``. Being a plain tensor, it is carried through a loop and updated by ``optim.adam`` like any
  parameter.
* **Cameras** are a dict of tensors for a batch of ``B`` views: ``origin (B, 3)``, ``rotation (B, 3, 3)``
  (camera-to-world; columns right, up, back: the camera looks along ``-back``, OpenGL-style), ``focal (B,)``
  (focal length over image width, so a camera fits any resolution), ``azimuth``/``elevation (B,)`` in degrees.
  Random cameras come from ``(seed, index)`` on CPU, so every device draws the same views.
* **Rendering** is emission-absorption volume rendering (Max 1995, as in NeRF, Mildenhall et al. 2020):
  stratified samples between the ray's entry into and exit from the cube, ``w_k = T_k (1 - exp(-sigma_k d))``
  with ``T_k = exp(-sum_{j<k} sigma_j d)``, colour ``sum_k w_k c_k + (1 - sum_k w_k) * background``.
* **Meshes** are dicts ``{"vertices": (V, 3) float, "faces": (F, 3) long, "colors": (V, 3) float}`` in world
  units. Marching cubes is scikit-image's (Lewiner et al. 2003, whose case table resolves the ambiguous faces
  and cubes consistently with the trilinear interpolant), oriented so normals point out (counter-clockwise seen
  from outside). The volume is padded with empty space, so a field touching the cube's boundary still gives a
  closed mesh.

scikit-image (marching cubes) and open3d (mesh files) are the ``mesh`` extra; each is imported only when used, so
nothing else needs them. The cameras and the renderer are our own: a dense-grid emission-absorption renderer is
~40 lines over ``grid_sample``, while the libraries that have one (pytorch3d, nerfacc) are large compiled
dependencies built around other scene representations.
"""
