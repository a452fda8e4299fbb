"""Depth cameras on MuJoCo scenes: render metric depth, back-project to the world frame.

Shapes: H, W image rows and columns; M back-projected points (variable).

With ``image`` set, a camera renders colour and depth of the scene in ONE render
(``mjr_render`` then ``mjr_readPixels`` of both buffers): the policy's image and its
point cloud are the same frame. ``image="rgbd"`` adds depth as a fourth uint8 channel
(``depth_to_uint8``: centimetres from the camera, saturating at 2.55 m).

Geometry (exact, no hand-tuned rotations):
  * intrinsics from the camera's ``fovy`` and the image size (square pixels, principal
    point at the image centre, pixel centres at integer coordinates as Open3D expects);
  * extrinsics from *this* camera's pose in ``mjData`` (``cam_xpos``, ``cam_xmat``),
    read at render time, so tracking cameras and cameras moved by a user stay right.
MuJoCo cameras look along -z with +y up; Open3D (OpenCV convention) looks along +z
with +y down, hence the ``diag(1, -1, -1)`` between the two frames.
"""

from __future__ import annotations

import os

import numpy as np

import mujoco
import open3d as o3d

from sodp3d.errors import UserError

# MuJoCo camera frame -> OpenCV camera frame (flip y and z).
_MJ_TO_CV = np.diag([1.0, -1.0, -1.0])

IMAGE_MODES = ("rgb", "rgbd")
DEPTH_STEP_M = 0.01  # one uint8 level of an rgbd image's depth channel: 1 cm, so 255 is 2.55 m or more


def depth_to_uint8(depth: np.ndarray) -> np.ndarray:
    """Metric depth (H, W) -> (H, W) uint8 in steps of ``DEPTH_STEP_M``, saturating at 255."""
    return np.clip(np.rint(depth / DEPTH_STEP_M), 0, 255).astype(np.uint8)


def image_channels(mode: str | None) -> int:
    """Channels of one camera's image: 3 (rgb), 4 (rgbd), 0 (no image)."""
    return {None: 0, "rgb": 3, "rgbd": 4}[mode]


def camera_names(model: mujoco.MjModel) -> list[str]:
    return [model.camera(i).name for i in range(model.ncam)]


def _renderer(model: mujoco.MjModel, height: int, width: int) -> mujoco.Renderer:
    try:
        return mujoco.Renderer(model, height, width)
    except Exception as e:  # mujoco.FatalError from the GL loader, or an EGL error
        import sodp3d

        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}"
        if sodp3d.MUJOCO_IMPORTED_FIRST:
            raise UserError(
                f"MuJoCo could not open a GL context ({reason}): mujoco was imported before sodp3d without "
                "MUJOCO_GL set, so it chose a windowed backend; import sodp3d first or export MUJOCO_GL=egl"
            ) from None
        raise UserError(
            f"MuJoCo could not open an offscreen GL context with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({reason}); "
            "headless rendering needs the system packages libegl1 libopengl0 libgl1-mesa-dri (make install adds them)"
        ) from None


class DepthCamera:
    """One named camera of a scene, rendering depth (and optionally colour) to a cloud.

    The renderer is created once and reused; ``cloud(data)`` renders the current state
    of ``data`` and returns world-frame points, float32, (M, 3) or (M, 6) with RGB in
    [0, 1] when ``rgb`` is set.
    """

    def __init__(self, model: mujoco.MjModel, name: str, height: int, width: int, rgb: bool = False,
                 image: str | None = None):
        cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name)
        if cam_id < 0:
            raise UserError(f"unknown camera '{name}'; this scene has: {', '.join(camera_names(model))}")
        if height <= 0 or width <= 0:
            raise UserError(f"camera resolution must be positive, got {height}x{width}")
        if model.cam_sensorsize[cam_id].any():
            raise UserError(f"camera '{name}' defines a physical sensor; only fovy cameras are supported")
        self.model = model
        self.name = name
        self.cam_id = cam_id
        self.height, self.width = int(height), int(width)
        self.rgb = rgb
        if image not in (None,) + IMAGE_MODES:
            raise UserError(f"unknown image mode {image!r}; valid: {', '.join(IMAGE_MODES)} or null")
        self.image_mode = image
        # The offscreen buffer limits the size; grow it for this model if asked for more.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        # With an image, one renderer gives colour and depth (render()); the depth-only one
        # is built when depth() is first called, which observing never does then.
        self._depth_renderer = self._rgb_renderer = None
        if image:  # colour and depth from one render of this renderer (see render())
            samples, model.vis.quality.offsamples = model.vis.quality.offsamples, 0
            try:  # no multisampling: a resolved multisample depth buffer is off by a sub-pixel
                self._rgb_renderer = _renderer(model, self.height, self.width)
            finally:
                model.vis.quality.offsamples = samples
            # The reversed-z depth buffer -> metric depth constants, as Renderer.render has them.
            extent = model.stat.extent
            znear, zfar = np.float32(model.vis.map.znear * extent), np.float32(model.vis.map.zfar * extent)
            self._depth_c = np.float32(-0.5) * (-(zfar + znear) / (zfar - znear)) - np.float32(0.5)
            self._depth_d = np.float32(-0.5) * (-(np.float32(2) * zfar * znear) / (zfar - znear))
        else:
            self._depth_renderer = self._new_depth_renderer()
            if rgb:
                self._rgb_renderer = _renderer(model, self.height, self.width)
        fovy = np.deg2rad(model.cam_fovy[cam_id])
        self.focal = 0.5 * self.height / np.tan(0.5 * fovy)
        self.intrinsic = o3d.camera.PinholeCameraIntrinsic(
            self.width, self.height, self.focal, self.focal, (self.width - 1) / 2.0, (self.height - 1) / 2.0
        )
        # Pixels at (or numerically near) the far clipping plane saw nothing.
        self.far = float(model.vis.map.zfar * model.stat.extent)
        self.depth_trunc = 0.99 * self.far

    # -- rendering -------------------------------------------------------------------
    def _new_depth_renderer(self) -> mujoco.Renderer:
        renderer = _renderer(self.model, self.height, self.width)
        renderer.enable_depth_rendering()
        return renderer

    def depth(self, data: mujoco.MjData) -> np.ndarray:
        """Metric depth along the optical axis, (H, W) float32, row 0 at the top."""
        if self._depth_renderer is None:
            self._depth_renderer = self._new_depth_renderer()
        self._depth_renderer.update_scene(data, camera=self.cam_id)
        return self._depth_renderer.render()

    def color(self, data: mujoco.MjData) -> np.ndarray:
        """(H, W, 3) uint8."""
        if self._rgb_renderer is None:
            raise RuntimeError("camera was built without rgb")
        self._rgb_renderer.update_scene(data, camera=self.cam_id)
        return self._rgb_renderer.render()

    def render(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray]:
        """Colour (H, W, 3) uint8 and metric depth (H, W) float32 of ONE render of the
        current state, row 0 at the top (mujoco.Renderer renders one or the other; this
        reads both buffers after the same ``mjr_render``, and converts the depth buffer as
        ``Renderer.render`` does). Rendered without multisampling, skybox and shadows; the
        depth equals the depth-only renderer's bit for bit, so the cloud is the same."""
        r = self._rgb_renderer
        if r is None:
            raise RuntimeError("camera was built without rgb or image")
        r.update_scene(data, camera=self.cam_id)
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = False  # the sky would be depth tens of metres away
        # No shadows: offscreen GL on a CPU draws a 4096^2 shadow map per frame (74 ms vs 11 ms a
        # render at 84 x 84, about the depth-only render's cost); the depth is unaffected.
        r.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        if r._gl_context:
            r._gl_context.make_current()
        rgb = np.empty((self.height, self.width, 3), np.uint8)
        raw = np.empty((self.height, self.width), np.float32)
        mujoco.mjr_render(r._rect, r._scene, r._mjr_context)
        mujoco.mjr_readPixels(rgb, raw, r._rect, r._mjr_context)
        depth = (self._depth_d / (raw.astype(np.float64) + self._depth_c)).astype(np.float32)  # metric, via float64
        return np.ascontiguousarray(np.flipud(rgb)), np.ascontiguousarray(np.flipud(depth))

    def image(self, rgb: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """The policy's image of one render: (H, W, 3) or (H, W, 4) uint8 (rgbd)."""
        if self.image_mode == "rgbd":
            return np.concatenate([rgb, depth_to_uint8(depth)[..., None]], axis=-1)
        return rgb

    # -- geometry --------------------------------------------------------------------
    def camera_to_world(self, data: mujoco.MjData) -> np.ndarray:
        """4x4 pose of the OpenCV-convention camera frame in the world."""
        pose = np.eye(4)
        pose[:3, :3] = data.cam_xmat[self.cam_id].reshape(3, 3) @ _MJ_TO_CV
        pose[:3, 3] = data.cam_xpos[self.cam_id]
        return pose

    def extrinsic(self, data: mujoco.MjData) -> np.ndarray:
        """4x4 world -> camera transform (what Open3D calls the extrinsic)."""
        pose = self.camera_to_world(data)
        ext = np.eye(4)
        ext[:3, :3] = pose[:3, :3].T
        ext[:3, 3] = -pose[:3, :3].T @ pose[:3, 3]
        return ext

    def project(self, data: mujoco.MjData, points: np.ndarray) -> np.ndarray:
        """World points (P, 3) -> pixel (u, v) and depth, (P, 3). For tests and plots."""
        ext = self.extrinsic(data)
        cam = points @ ext[:3, :3].T + ext[:3, 3]
        u = self.focal * cam[:, 0] / cam[:, 2] + (self.width - 1) / 2.0
        v = self.focal * cam[:, 1] / cam[:, 2] + (self.height - 1) / 2.0
        return np.stack([u, v, cam[:, 2]], axis=1)

    def back_project(self, depth: np.ndarray, data: mujoco.MjData, color: np.ndarray | None = None) -> np.ndarray:
        """Depth image (H, W) -> world-frame cloud (M, 3), or (M, 6) with colour."""
        extrinsic = self.extrinsic(data)
        depth_img = o3d.geometry.Image(np.ascontiguousarray(depth, dtype=np.float32))
        if color is None:
            pcd = o3d.geometry.PointCloud.create_from_depth_image(
                depth_img, self.intrinsic, extrinsic, depth_scale=1.0, depth_trunc=self.depth_trunc
            )
            return np.asarray(pcd.points, dtype=np.float32)
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(color)),
            depth_img,
            depth_scale=1.0,
            depth_trunc=self.depth_trunc,
            convert_rgb_to_intensity=False,
        )
        pcd = o3d.geometry.PointCloud.create_from_rgbd_image(rgbd, self.intrinsic, extrinsic)
        return np.concatenate(
            [np.asarray(pcd.points, dtype=np.float32), np.asarray(pcd.colors, dtype=np.float32)], axis=1
        )

    def cloud(self, data: mujoco.MjData) -> np.ndarray:
        """Render the current state and back-project: world-frame (M, 3|6) float32."""
        return self.observe(data)[0]

    def observe(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray | None]:
        """Render the current state: (world-frame cloud (M, 3|6) float32, the image or None).
        With an image, cloud and image come from one render."""
        if self.image_mode is None:
            depth = self.depth(data)
            color = self.color(data) if self.rgb else None
            return self.back_project(depth, data, color), None
        color, depth = self.render(data)
        return self.back_project(depth, data, color if self.rgb else None), self.image(color, depth)

    def close(self) -> None:
        for r in (self._depth_renderer, self._rgb_renderer):
            if r is not None:
                r.close()
        self._depth_renderer = self._rgb_renderer = None


def refresh_kinematics(model: mujoco.MjModel, data: mujoco.MjData) -> None:
    """Bring body, geom, site and camera poses up to date with qpos and mocap.

    After ``mj_step`` these poses still describe the state before the last integration
    step; rendering them would show the scene one physics substep late, and a state
    restored later would render differently from the live one. This is kinematics
    only (no dynamics, no solver), so the simulation that follows is unchanged.
    """
    mujoco.mj_kinematics(model, data)
    mujoco.mj_comPos(model, data)
    mujoco.mj_camlight(model, data)


def fused_cloud(cameras: list[DepthCamera], data: mujoco.MjData) -> np.ndarray:
    """All cameras' clouds of the current state in one world-frame array."""
    return fused_observation(cameras, data)[0]


def fused_observation(cameras: list[DepthCamera], data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray | None]:
    """All cameras' clouds of the current state in one world-frame array, and the first
    camera's image (H, W, 3|4) when it renders one (the settings allow an image with one
    camera only)."""
    refresh_kinematics(cameras[0].model, data)
    seen = [cam.observe(data) for cam in cameras]
    clouds = [c for c, _ in seen]
    return (clouds[0] if len(clouds) == 1 else np.concatenate(clouds, axis=0)), seen[0][1]
