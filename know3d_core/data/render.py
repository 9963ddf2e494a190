"""Renders: the per-asset camera plan (view sets, front/back pairs) and a PBR OpenGL renderer.

Cameras (``plan_views``): per asset, one field of view and one elevation are drawn (FoV uniform in
1 / radius^2 over ``layout.FOV_RANGE_DEG`` with the radius that keeps the unit cube's bounding sphere in
view, as TRELLIS.2's ``render_cond.py``; elevation uniform over ``layout.ELEVATION_RANGE_DEG``). Then
for each of ``layout.VIEW_SETS``: a ring of azimuths uniformly over 360 degrees (azimuth 0 = the
front); views k and k + n/2 form a front/back pair. The perturbed set scales the FoV and jitters
azimuth and elevation per view. Conventions (model space, ``c2w``, ``intrinsics``): see
``know3d_core.data.layout``.

Renderer (``GLRenderer``): moderngl on a headless EGL context: Mesa's llvmpipe on a CPU machine (CI),
the NVIDIA driver on a GPU machine; one code path, so the camera conventions are the same
everywhere. It shades glTF metallic-roughness materials (base colour factor x texture x vertex
colour, metallic / roughness factors x texture) with a GGX specular + Lambert diffuse under a fixed
three-light rig and an ambient term, two-sided, 4x MSAA, and writes straight-alpha RGBA PNGs on a
transparent background. Normal, occlusion and emissive maps are not used.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import layout

__all__ = ["RendererUnavailable", "look_at_c2w", "camera_position", "intrinsics", "plan_views", "plan_pairs",
           "project", "GLRenderer", "BlenderRenderer", "RENDERERS", "make_renderer", "render_asset"]


class RendererUnavailable(RuntimeError):
    """No OpenGL renderer can start here; the message says what to install."""


# ------------------------------------------------------------------------------- cameras
def camera_position(azimuth_deg: float, elevation_deg: float, radius: float) -> np.ndarray:
    """World position of a camera looking at the origin; azimuth 0 = -Y (the front), 90 = +X."""
    a, e = math.radians(azimuth_deg), math.radians(elevation_deg)
    return np.array([math.sin(a) * math.cos(e), -math.cos(a) * math.cos(e), math.sin(e)]) * radius


def look_at_c2w(position: np.ndarray, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """4x4 camera-to-world (OpenGL: camera x right, y up, looking along -z)."""
    position = np.asarray(position, dtype=np.float64)
    forward = np.asarray(target, dtype=np.float64) - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, np.asarray(up, dtype=np.float64))
    if np.linalg.norm(right) < 1e-9:  # looking straight up or down
        right = np.cross(forward, np.array([0.0, 1.0, 0.0]))
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, cam_up, -forward, position
    return c2w


def intrinsics(fov_deg: float) -> np.ndarray:
    """3x3 intrinsics in normalised image units (square image; x right, y down, origin top-left)."""
    f = 0.5 / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, 0.5], [0.0, f, 0.5], [0.0, 0.0, 1.0]])


def project(points: np.ndarray, c2w: np.ndarray, K: np.ndarray) -> np.ndarray:
    """World points [N, 3] -> normalised image coordinates [N, 2] (x right, y down, 0..1)."""
    w2c = np.linalg.inv(c2w)
    p = points @ w2c[:3, :3].T + w2c[:3, 3]
    x, y, depth = p[:, 0], -p[:, 1], -p[:, 2]  # OpenGL camera -> image axes (y down), depth > 0 ahead
    return np.stack([K[0, 0] * x / depth + K[0, 2], K[1, 1] * y / depth + K[1, 2]], axis=1)


def _draw_fov(rng: np.random.Generator) -> float:
    lo, hi = layout.FOV_RANGE_DEG
    r_min, r_max = layout.camera_radius(hi), layout.camera_radius(lo)
    k = rng.uniform(1.0 / r_max ** 2, 1.0 / r_min ** 2)
    return math.degrees(2.0 * math.asin(math.sqrt(3.0) / 2.0 * math.sqrt(k)))


def plan_views(seed: int) -> List[Dict]:
    """Every view of one asset (deterministic from ``seed``), in ``layout.VIEW_SETS`` order.

    Each view: ``file`` (relative to the asset folder), ``set``, ``ring`` (index in its set),
    ``azimuth``, ``elevation``, ``fov`` (degrees), ``radius``, ``c2w`` (4x4 list), ``intrinsics`` (3x3).
    """
    rng = np.random.default_rng(int(seed))
    fov = _draw_fov(rng)
    elevation = float(rng.uniform(*layout.ELEVATION_RANGE_DEG))
    radius = layout.camera_radius(fov)
    views = []
    for vs in layout.VIEW_SETS:
        for k in range(vs.n_azimuths):
            az, el, f = 360.0 * k / vs.n_azimuths, elevation, fov
            if vs.perturbed:
                az += float(rng.uniform(-1, 1)) * layout.PERTURB_AZIMUTH_DEG
                el += float(rng.uniform(-1, 1)) * layout.PERTURB_ELEVATION_DEG
                f = fov * float(rng.uniform(*layout.PERTURB_FOV_SCALE))
            views.append({
                "file": layout.view_file(len(views)), "set": vs.name, "ring": k, "azimuth": az % 360.0,
                "elevation": el, "fov": f, "radius": radius,
                "c2w": look_at_c2w(camera_position(az, el, radius)).tolist(), "intrinsics": intrinsics(f).tolist(),
            })
    return views


def plan_pairs(views: Sequence[Dict]) -> List[Dict]:
    """Front/back pairs of ``views`` (``layout.pair_indices`` per set): ``{front, back, set, annotations}``."""
    pairs = []
    for vs in layout.VIEW_SETS:
        ring = {v["ring"]: v["file"] for v in views if v["set"] == vs.name}
        for a, b in layout.pair_indices(vs.n_azimuths):
            pairs.append({"front": ring[a], "back": ring[b], "set": vs.name, "annotations": []})
    return pairs


# ------------------------------------------------------------------------------ renderer
_VERTEX = """
#version 330
uniform mat4 mvp;
in vec3 in_pos; in vec3 in_normal; in vec2 in_uv; in vec4 in_color;
out vec3 v_pos; out vec3 v_normal; out vec2 v_uv; out vec4 v_color;
void main() {
    v_pos = in_pos; v_normal = in_normal; v_uv = in_uv; v_color = in_color;
    gl_Position = mvp * vec4(in_pos, 1.0);
}
"""
_FRAGMENT = """
#version 330
uniform vec3 eye;
uniform vec4 base_factor;
uniform float metallic_factor; uniform float roughness_factor;
uniform bool has_base_tex; uniform bool has_mr_tex;
uniform sampler2D base_tex; uniform sampler2D mr_tex;
uniform vec3 light_dir[3]; uniform vec3 light_rgb[3]; uniform vec3 ambient;
in vec3 v_pos; in vec3 v_normal; in vec2 v_uv; in vec4 v_color;
out vec4 frag;
const float PI = 3.14159265;
vec3 to_linear(vec3 c) { return pow(c, vec3(2.2)); }
void main() {
    vec2 uv = vec2(v_uv.x, 1.0 - v_uv.y);  // trimesh uv: origin bottom-left; texture rows: top first
    vec4 base = base_factor * v_color;
    if (has_base_tex) { vec4 t = texture(base_tex, uv); base *= vec4(to_linear(t.rgb), t.a); }
    float metallic = metallic_factor, rough = roughness_factor;
    if (has_mr_tex) { vec3 t = texture(mr_tex, uv).rgb; rough *= t.g; metallic *= t.b; }
    rough = clamp(rough, 0.04, 1.0);
    vec3 n = normalize(v_normal);
    if (!gl_FrontFacing) n = -n;
    vec3 v = normalize(eye - v_pos);
    if (dot(n, v) < 0.0) n = -n;  // two-sided regardless of winding
    vec3 f0 = mix(vec3(0.04), base.rgb, metallic);
    vec3 color = ambient * base.rgb * (1.0 - 0.5 * metallic);
    for (int i = 0; i < 3; i++) {
        vec3 l = normalize(light_dir[i]);
        vec3 h = normalize(l + v);
        float nl = max(dot(n, l), 0.0), nv = max(dot(n, v), 1e-4), nh = max(dot(n, h), 0.0);
        float a2 = rough * rough * rough * rough;
        float d = a2 / (PI * pow(nh * nh * (a2 - 1.0) + 1.0, 2.0));
        float k = (rough + 1.0) * (rough + 1.0) / 8.0;
        float g = (nl / (nl * (1.0 - k) + k)) * (nv / (nv * (1.0 - k) + k));
        vec3 f = f0 + (1.0 - f0) * pow(1.0 - max(dot(h, v), 0.0), 5.0);
        vec3 spec = d * g * f / max(4.0 * nl * nv, 1e-4);
        vec3 diff = (1.0 - f) * (1.0 - metallic) * base.rgb / PI;
        color += (diff + spec) * light_rgb[i] * nl * PI;
    }
    frag = vec4(pow(clamp(color, 0.0, 1.0), vec3(1.0 / 2.2)) * base.a, base.a);  // premultiplied
}
"""
# Light directions in camera space (x right, y up, z toward the viewer), so every view is lit alike.
_LIGHTS_CAM = (((0.4, 0.6, 1.0), (0.9, 0.9, 0.9)), ((-0.8, 0.2, 0.4), (0.35, 0.35, 0.4)), ((0.0, 0.8, -0.6), (0.3, 0.3, 0.3)))
_AMBIENT = (0.25, 0.25, 0.27)


def _perspective(fov_deg: float, near: float, far: float) -> np.ndarray:
    f = 1.0 / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0, 0, 0], [0, f, 0, 0],
                     [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)], [0, 0, -1, 0]])


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals [V, 3] (vertices not shared across a crease stay flat)."""
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.maximum(length, 1e-20)).astype(np.float32)


class GLRenderer:
    """Headless OpenGL renderer (moderngl + EGL) of ``assets.Asset`` objects into RGBA images."""

    def __init__(self, size: int, samples: int = 4):
        try:
            import moderngl
        except ImportError:
            raise RendererUnavailable(
                "rendering needs moderngl: pip install 'comfyui-know3d[data]' (or pip install moderngl)") from None
        try:
            self.ctx = moderngl.create_standalone_context(backend="egl")
        except Exception as e:
            raise RendererUnavailable(
                f"no headless OpenGL (EGL) context: {' '.join(str(e).split())[:160]}. Install an EGL driver "
                "(Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri; on NVIDIA machines the driver's "
                "libEGL_nvidia) or skip the step with --skip render") from None
        self.size = int(size)
        self.prog = self.ctx.program(vertex_shader=_VERTEX, fragment_shader=_FRAGMENT)
        self.msaa = self.ctx.framebuffer(
            color_attachments=[self.ctx.renderbuffer((self.size, self.size), 4, samples=samples)],
            depth_attachment=self.ctx.depth_renderbuffer((self.size, self.size), samples=samples))
        self.resolve = self.ctx.framebuffer(color_attachments=[self.ctx.renderbuffer((self.size, self.size), 4)])
        self._objects: list = []
        self.renderer_name = self.ctx.info.get("GL_RENDERER", "?")

    def release(self) -> None:
        self._clear()
        self.ctx.release()

    def _clear(self) -> None:
        for obj in self._objects:
            for o in obj[:-1]:
                if o is not None:
                    o.release()
        self._objects = []

    def _texture(self, image: Optional[np.ndarray]):
        if image is None:
            return None
        img = np.ascontiguousarray(image)
        tex = self.ctx.texture((img.shape[1], img.shape[0]), img.shape[2], img.tobytes())
        tex.build_mipmaps()
        tex.repeat_x = tex.repeat_y = True
        return tex

    def load(self, asset) -> None:
        """Upload ``asset``'s primitives (replacing the previous asset)."""
        self._clear()
        for p in asset.primitives:
            v = p.vertices.astype(np.float32)
            n_v = v.shape[0]
            normals = _vertex_normals(v, p.faces)
            uv = p.uv if p.uv is not None else np.zeros((n_v, 2), np.float32)
            col = p.colors if p.colors is not None else np.ones((n_v, 4), np.float32)
            data = np.concatenate([v, normals, uv.astype(np.float32), col.astype(np.float32)], axis=1)
            vbo = self.ctx.buffer(np.ascontiguousarray(data, dtype=np.float32).tobytes())
            ibo = self.ctx.buffer(np.ascontiguousarray(p.faces, dtype=np.int32).tobytes())
            vao = self.ctx.vertex_array(self.prog, [(vbo, "3f 3f 2f 4f", "in_pos", "in_normal", "in_uv", "in_color")],
                                        index_buffer=ibo, index_element_size=4)
            base_tex = self._texture(p.base_color_texture)
            mr_tex = self._texture(p.metallic_roughness_texture)
            self._objects.append((vbo, ibo, vao, base_tex, mr_tex, p))

    def render(self, c2w: np.ndarray, fov_deg: float) -> np.ndarray:
        """One view of the loaded asset: uint8 [S, S, 4] straight-alpha RGBA (transparent background)."""
        import moderngl

        c2w = np.asarray(c2w, dtype=np.float64)
        eye = c2w[:3, 3]
        dist = float(np.linalg.norm(eye))
        near, far = max(dist - 1.0, 0.01), dist + 1.0
        mvp = _perspective(fov_deg, near, far) @ np.linalg.inv(c2w)
        self.msaa.use()
        self.ctx.enable(moderngl.DEPTH_TEST)
        self.ctx.disable(moderngl.CULL_FACE)
        self.ctx.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        prog = self.prog
        prog["mvp"].write(mvp.T.astype(np.float32).tobytes())
        prog["eye"].value = tuple(float(x) for x in eye)
        prog["light_dir"].write(np.array([c2w[:3, :3] @ np.array(d) for d, _ in _LIGHTS_CAM], np.float32).tobytes())
        prog["light_rgb"].write(np.array([c for _, c in _LIGHTS_CAM], np.float32).tobytes())
        prog["ambient"].value = _AMBIENT
        for vbo, ibo, vao, base_tex, mr_tex, p in self._objects:
            prog["base_factor"].value = tuple(float(c) for c in p.base_color_factor)
            prog["metallic_factor"].value = float(p.metallic)
            prog["roughness_factor"].value = float(p.roughness)
            prog["has_base_tex"].value = base_tex is not None
            prog["has_mr_tex"].value = mr_tex is not None
            if base_tex is not None:
                base_tex.use(0)
                prog["base_tex"].value = 0
            if mr_tex is not None:
                mr_tex.use(1)
                prog["mr_tex"].value = 1
            vao.render(moderngl.TRIANGLES)
        self.ctx.copy_framebuffer(self.resolve, self.msaa)
        raw = self.resolve.read(components=4, alignment=1)
        img = np.frombuffer(raw, dtype=np.uint8).reshape(self.size, self.size, 4)[::-1].astype(np.float32)
        alpha = img[..., 3:4]
        rgb = np.where(alpha > 0, img[..., :3] * 255.0 / np.maximum(alpha, 1.0), 0.0)  # un-premultiply
        return np.concatenate([rgb, alpha], axis=-1).round().clip(0, 255).astype(np.uint8)


@contextlib.contextmanager
def _quiet_stdout():
    """Silence the process's stdout file descriptor (C code's prints included) for the block."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class BlenderRenderer:
    """Cycles on the CPU through ``bpy`` (Blender as a Python module; wheels for Python 3.11 as bpy 4.5,
    3.13 as bpy 5.x, none for 3.12). Same interface, cameras and light rig as :class:`GLRenderer`:
    the asset is imported from :func:`assets.asset_glb_bytes` (Blender's glTF importer turns Y up into
    Z up, i.e. back into model space), each view sets the camera's ``c2w`` (Blender cameras look along
    -Z with +Y up, as OpenGL) and FoV, the three sun lights follow the camera, the world colour is the
    ambient term, and the film is transparent (straight-alpha RGBA PNG, Standard view transform)."""

    def __init__(self, size: int, samples: int = 32):
        try:
            import bpy
        except ImportError:
            raise RendererUnavailable(
                "the Blender renderer needs bpy (Blender as a Python module): pip install 'comfyui-know3d[blender]' "
                "(wheels exist for Python 3.11 and 3.13 only); or use --renderer opengl") from None
        self.bpy, self.size, self.samples = bpy, int(size), int(samples)
        self.renderer_name = f"blender {bpy.app.version_string} cycles"
        self._tmp = None

    def release(self) -> None:
        import shutil

        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def load(self, asset) -> None:
        import tempfile

        from .assets import asset_glb_bytes

        bpy = self.bpy
        with _quiet_stdout():
            bpy.ops.wm.read_factory_settings(use_empty=True)
        self.release()
        self._tmp = tempfile.mkdtemp(prefix="know3d-blender-")
        glb = os.path.join(self._tmp, "asset.glb")
        with open(glb, "wb") as f:
            f.write(asset_glb_bytes(asset))
        with _quiet_stdout():
            bpy.ops.import_scene.gltf(filepath=glb)
        scene = bpy.context.scene
        scene.render.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = self.samples
        scene.cycles.use_denoising = False
        scene.render.film_transparent = True
        scene.render.resolution_x = scene.render.resolution_y = self.size
        scene.render.resolution_percentage = 100
        scene.render.image_settings.file_format = "PNG"
        scene.render.image_settings.color_mode = "RGBA"
        scene.view_settings.view_transform = "Standard"
        world = bpy.data.worlds.new("ambient")
        world.use_nodes = True
        world.node_tree.nodes["Background"].inputs[0].default_value = (*_AMBIENT, 1.0)
        scene.world = world
        cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
        scene.collection.objects.link(cam)
        scene.camera = cam
        self._suns = []
        for k, (_, rgb) in enumerate(_LIGHTS_CAM):
            light = bpy.data.lights.new(f"sun{k}", type="SUN")
            # GLRenderer's Lambert term gives albedo * rgb * cos; a Cycles sun of strength S gives albedo * S / pi * cos
            light.energy = math.pi * max(rgb)
            light.color = tuple(c / max(rgb) for c in rgb)
            light.angle = 0.0
            obj = bpy.data.objects.new(f"sun{k}", light)
            scene.collection.objects.link(obj)
            self._suns.append(obj)

    def render(self, c2w: np.ndarray, fov_deg: float) -> np.ndarray:
        """One view: uint8 [S, S, 4] straight-alpha RGBA (transparent background)."""
        from mathutils import Matrix, Vector
        from PIL import Image

        bpy = self.bpy
        c2w = np.asarray(c2w, dtype=np.float64)
        cam = bpy.context.scene.camera
        cam.matrix_world = Matrix(c2w.tolist())
        cam.data.sensor_fit = "AUTO"
        cam.data.angle = math.radians(fov_deg)
        dist = float(np.linalg.norm(c2w[:3, 3]))
        cam.data.clip_start, cam.data.clip_end = max(dist - 1.0, 0.01), dist + 1.0
        for obj, (direction, _) in zip(self._suns, _LIGHTS_CAM):
            to_light = c2w[:3, :3] @ np.asarray(direction, np.float64)
            # a sun shines along its local -Z: point -Z away from the light direction
            obj.rotation_euler = Vector((-to_light).tolist()).to_track_quat("-Z", "Y").to_euler()
        path = os.path.join(self._tmp, "view.png")
        bpy.context.scene.render.filepath = path
        with _quiet_stdout():  # Cycles prints a progress line per sample
            bpy.ops.render.render(write_still=True)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA"), dtype=np.uint8).copy()


RENDERERS = {"opengl": GLRenderer, "blender": BlenderRenderer}


def make_renderer(kind: str, size: int):
    """``opengl`` (:class:`GLRenderer`, default) or ``blender`` (:class:`BlenderRenderer`)."""
    if kind not in RENDERERS:
        raise ValueError(f"unknown renderer {kind!r}; choose from {', '.join(RENDERERS)}")
    return RENDERERS[kind](size)


def render_asset(renderer, asset, views: Sequence[Dict], out_dir: str, workers: int = 0) -> List[str]:
    """Render every view of ``views`` into ``out_dir/<view file>`` (PNG). Returns the paths.

    Views render one after another (one GL context); PNG encoding runs on ``workers`` threads
    (default: up to 8) while the next views render."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def save(img: np.ndarray, path: str) -> str:
        Image.fromarray(img, "RGBA").save(path)
        return path

    renderer.load(asset)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = []
        for v in views:
            img = renderer.render(np.asarray(v["c2w"]), v["fov"])
            path = os.path.join(out_dir, v["file"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            futures.append(pool.submit(save, img, path))
        return [f.result() for f in futures]
