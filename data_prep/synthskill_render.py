"""SynthSkill scene renderer: one video and its tool-mask video from a video's latents.

`render_video(item, ...)` turns the per-video skill latents of `synthskill.sample_latents`
(motion, handling, tissue in [0, 1]) into a keyframed task script (`_Script`: four
stitches of park, reach, bite, grasp, pull and hand over, in 'natural' seconds) and draws
it with OpenCV: noise-textured tissue with an incision, two instruments (shaft, wrist,
opening jaws), a curved needle and thread, with the nuisances (camera pans and zooms,
lighting drift and steps, vignetting) from their own random stream. How each factor
shows in the pixels is described in `synthskill`'s module docstring.
"""
from __future__ import annotations

import cv2
import numpy as np

NUM_STITCHES = 4
NATURAL_RANGE = (30.0, 70.0)  # script seconds of an expert / a novice (mapped to min..max)
NEEDLE_GRASP = {"R": 0.2, "L": 0.85}  # fraction along the needle arc (tail -> tip)


def _min_jerk(tau):
    return tau ** 3 * (10 - 15 * tau + 6 * tau ** 2)


def _unit(v):
    return v / max(float(np.hypot(*v)), 1e-6)


def _dir(a):
    return np.array([np.cos(a), np.sin(a)])


class _Script:
    """Keyframed task script in 'natural' seconds: tool tips, jaws, needle, tissue events."""

    def __init__(self, rng, lat, size, world):
        self.rng, self.m, self.h, self.t_sk = rng, lat["motion"], lat["handling"], lat["tissue"]
        self.S, self.t, self.stats = size, 0.0, dict(regrasps=0, pauses=0, out_of_view=0,
                                                      bleeds=0, tears=0)
        self.base = {"L": np.array([-0.6, 1.5]) * world, "R": np.array([1.6, 1.5]) * world}
        self.keys = {k: [] for k in "LR"}  # (t, x, y, jaw, jerk_blend)
        self.needle_mode, self.needle_angle = [], []  # (t, mode, centre), (t, a0)
        self.events, self.deform = [], []  # (t, kind, data), (t0, t1, centre, pull_dir, amp)

    def pos(self, tool):
        return np.array(self.keys[tool][-1][1:3])

    def put(self, tool, t, p, jaw, blend=0.0):
        self.keys[tool].append((t, float(p[0]), float(p[1]), float(jaw), blend))

    def move(self, dur, **targets):
        """Both tools move concurrently for `dur`; less motion skill -> sub-movements, jerk."""
        m, S = self.m, self.S
        for tool in "LR":
            p0, jaw0 = self.pos(tool), self.keys[tool][-1][3]
            p1, jaw1 = targets.get(tool, (p0, jaw0))
            n_sub = 1 + (self.count(2.0 * (1 - m) ** 1.5) if tool in targets else 0)
            for i in range(1, n_sub + 1):
                f = i / n_sub
                p = p0 + f * (p1 - p0)
                if i < n_sub:
                    p = p + self.rng.normal(0, 0.06 * S * (1 - m), 2)
                self.put(tool, self.t + f * dur, p, jaw0 + f * (jaw1 - jaw0), 0.85 * (1 - m))
        self.t += dur
        if self.rng.random() < 0.1 + 0.5 * (1 - m):  # idle pause
            self.stats["pauses"] += 1
            self.move_hold(self.rng.exponential(0.3 + 0.8 * (1 - m)))

    def move_hold(self, dur):
        for tool in "LR":
            self.put(tool, self.t + dur, self.pos(tool), self.keys[tool][-1][3])
        self.t += dur

    def count(self, mean):
        """A random count with the given mean and little spread (dithered rounding)."""
        return int(mean + self.rng.random())

    def corrections(self, tool, jaw):
        """Handling: dithering around a target before committing."""
        target = self.pos(tool)
        for _ in range(self.count(1.5 * (1 - self.h) ** 1.2)):
            off = self.rng.normal(0, 0.07 * self.S * (1 - self.h) + 0.01 * self.S, 2)
            self.put(tool, self.t + 0.35, target + off, jaw)
            self.put(tool, self.t + 0.7, target, jaw)
            self.move_hold(0.7)

    def run(self, wound_x, stitch_y):
        """The task: NUM_STITCHES cycles of park, reach, bite, grasp, pull and hand over."""
        S, h, ts, rng = self.S, self.h, self.t_sk, self.rng
        r = 0.075 * S
        grasp = lambda c, a0, who: c + r * _dir(a0 + NEEDLE_GRASP[who] * np.pi)
        sig = S * (0.006 + 0.05 * (1 - h))
        cs = [np.array([wound_x(y), y]) + rng.normal(0, sig, 2) for y in stitch_y]
        a0 = np.pi
        c_hold = cs[0] + np.array([0.25 * S, -0.25 * S])
        self.put("R", 0.0, grasp(c_hold, a0, "R"), 0.0)
        self.put("L", 0.0, cs[0] + np.array([-0.3 * S, -0.2 * S]), 1.0)
        self.needle_mode.append((0.0, "R", None))
        self.needle_angle.append((0.0, a0 - 2.5))
        for k, c in enumerate(cs):
            # the idle left tool is parked back along its shaft; poor handling parks it far,
            # out of view (rho > ~0.7); rarely it is withdrawn regardless of skill (nuisance)
            rho = float(np.clip(1.2 * (1 - h) + rng.normal(0, 0.1), 0, 1))
            nuisance = rng.random() < 0.08
            rho, hold = (1.5, rng.uniform(1.0, 2.0)) if nuisance else (rho, 0.0)
            self.stats["out_of_view"] += int(rho > 0.7)
            u_back = _unit(self.base["L"] - self.pos("L"))
            self.move(0.6, L=(self.pos("L") + u_back * rho * S, 1.0))
            self.move_hold(hold + (0.5 + 2.0 * (1 - h)) * rng.uniform(0.8, 1.2))
            entry, exit_ = c + np.array([r, 0.0]), c - np.array([r, 0.0])
            self.needle_angle.append((self.t, self.needle_angle[-1][1]))
            a_start, a_end = np.pi + 2 * np.pi * k, 2 * np.pi * (k + 1) + 0.6
            self.move(1.2, R=(grasp(c, np.pi, "R"), 0.0),
                      L=(exit_ + np.array([-0.12, -0.1]) * S, 1.0))
            self.needle_angle.append((self.t, a_start))
            self.corrections("R", 0.0)
            t0 = self.t  # bite: the needle turns about c through the tissue
            self.needle_mode.append((t0, "bite", c))
            self.move_hold(1.0)
            self.needle_angle.append((self.t, a_end))
            self.put("R", self.t, grasp(c, a_end, "R"), 0.0)
            amp = 0.02 + 0.09 * (1 - ts) ** 1.2
            self.deform.append((t0, self.t, c, np.array([-1.0, 0.3]), amp))
            for p, te in ((entry, t0), (exit_, t0 + 0.6)):
                rad = S * 0.06 * (1 - ts) ** 1.2 * rng.uniform(0.6, 1.4)
                if rad > 0.012 * S:
                    self.stats["bleeds"] += 1
                    self.events.append((te, "blood", (p + rng.normal(0, 0.01 * S, 2), rad)))
            g = grasp(c, a_end, "L")
            self.move(0.6, L=(g, 1.0))
            self.corrections("L", 1.0)
            n_re = self.count(1.5 * (1 - h) ** 1.2)
            self.stats["regrasps"] += int(n_re)
            for _ in range(n_re):  # failed grasps: close, reopen, back off, retry
                self.move(0.3, L=(g, 0.0))
                self.move(0.3, L=(g + rng.normal(0, 0.06 * S, 2), 1.0))
                self.move(0.3, L=(g, 1.0))
            self.move(0.4, L=(g, 0.0), R=(self.pos("R") + np.array([0.1, -0.06]) * S, 1.0))
            self.needle_mode.append((self.t, "L", None))
            t0 = self.t  # pull the thread up-left
            pull = g + np.array([-0.2, -0.22]) * S
            self.move(1.2, L=(pull, 0.0))
            self.deform.append((t0, self.t, exit_, _unit(pull - exit_), 0.5 * amp))
            if rng.random() < 0.9 * (1 - ts) ** 1.5:
                self.stats["tears"] += 1
                d = _unit(rng.normal(0, 1, 2)) * S * (0.05 + 0.15 * (1 - ts))
                self.events.append((t0 + 0.6, "tear", (exit_, exit_ + d)))
            self.events.append((self.t, "stitch", (entry, exit_, float(np.clip(
                0.2 + 0.75 * ts + rng.normal(0, 0.08), 0.05, 0.97)))))
            nxt = cs[k + 1] if k + 1 < len(cs) else c + np.array([0, 0.15 * S])
            hand = nxt + np.array([0.05, -0.22]) * S  # handover point
            c_hand = hand - r * _dir(a_end + NEEDLE_GRASP["L"] * np.pi)
            self.move(1.0, L=(hand, 0.0), R=(grasp(c_hand, a_end, "R") + [0.05 * S, 0], 1.0))
            self.move(0.5, R=(grasp(c_hand, a_end, "R"), 0.0))
            self.needle_mode.append((self.t, "R", None))
            self.move(0.4, L=(self.pos("L") + np.array([-0.1, 0.05]) * S, 1.0))


def _sample(keys, times):
    """Piecewise keyframe interpolation; each key: (t, values..., blend of min-jerk/linear)."""
    k = np.asarray(keys, np.float64)
    idx = np.clip(np.searchsorted(k[:, 0], times, side="right"), 1, max(len(k) - 1, 1))
    if len(k) == 1:
        return np.repeat(k[:, 1:-1], len(times), 0)
    tau = np.clip((times - k[idx - 1, 0]) / np.maximum(k[idx, 0] - k[idx - 1, 0], 1e-9), 0, 1)
    b = k[idx, -1]
    s = ((1 - b) * _min_jerk(tau) + b * tau)[:, None]
    return k[idx - 1, 1:-1] + s * (k[idx, 1:-1] - k[idx - 1, 1:-1])


def _tissue(rng, W, tint):
    """Procedural tissue: multi-octave value noise, fibres, vessels and specular spots."""
    n = np.zeros((W, W), np.float32)
    for cells, wgt in ((4, 0.5), (9, 0.3), (24, 0.15), (64, 0.08)):
        n += wgt * cv2.resize(rng.random((cells, cells)).astype(np.float32), (W, W),
                              interpolation=cv2.INTER_CUBIC)
    fib = cv2.GaussianBlur(rng.standard_normal((W, W)).astype(np.float32), (0, 0), W / 40, W / 300)
    fib /= fib.std() + 1e-6
    img = (np.array([118, 132, 205]) * tint * (0.8 + 0.5 * (n - n.mean()))[..., None]
           + 7 * fib[..., None] * np.array([1.0, 1.0, 0.6]))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 7)):  # small vessels: smooth random curves
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.25, 30))
        pts = np.cumsum(W / 40 * np.stack([np.cos(heading), np.sin(heading)], 1), 0)
        cv2.polylines(img, [np.int32((pts + rng.uniform(0, W, 2)) * 16)], False, (95, 90, 175),
                      1, cv2.LINE_AA, 4)
    spec = np.zeros((W, W), np.float32)  # moist specular glints
    for _ in range(rng.integers(4, 9)):
        cv2.ellipse(spec, _pt(rng.uniform(0, W, 2)), _pt((W / 30, W / 90)),
                    rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA, 4)
    spec = cv2.GaussianBlur(spec, (0, 0), W / 150)[..., None]
    return np.clip(img * (1 - 0.45 * spec) + 245 * 0.45 * spec, 0, 255).astype(np.uint8)


def _pt(p):
    return (round(float(p[0]) * 16), round(float(p[1]) * 16))  # 4-bit sub-pixel coordinates


def _draw_tool(img, mask, tip, base, jaw, S, z):
    """Shaft (with highlight and black band), wrist and two jaws; same shape into the mask."""
    u = _unit(tip - base)
    nrm = np.array([-u[1], u[0]])
    jl, th = 0.085 * S * z, max(2, int(round(0.075 * S * z)))
    wrist = tip - u * jl
    band = wrist - u * 0.05 * S * z
    parts = [(base, band, (175, 175, 182), th), (band, wrist, (40, 40, 44), th)]
    for side in (-1.0, 1.0):
        a = side * 0.5 * jaw
        d = np.array([u[0] * np.cos(a) - u[1] * np.sin(a), u[0] * np.sin(a) + u[1] * np.cos(a)])
        parts.append((wrist, wrist + d * jl, (95, 95, 100), max(1, int(round(0.028 * S * z)))))
    for p0, p1, col, t in parts:
        cv2.line(img, _pt(p0), _pt(p1), col, t, cv2.LINE_AA, 4)
        cv2.line(mask, _pt(p0), _pt(p1), 255, t, cv2.LINE_8, 4)
    cv2.line(img, _pt(base + nrm * th * 0.2), _pt(band + nrm * th * 0.2), (232, 232, 238),
             max(1, th // 5), cv2.LINE_AA, 4)
    cv2.circle(img, _pt(wrist), int(16 * 0.035 * S * z), (60, 60, 66), -1, cv2.LINE_AA, 4)
    cv2.circle(mask, _pt(wrist), int(16 * 0.035 * S * z), 255, -1, cv2.LINE_8, 4)


def render_video(item: dict, seed: int, size: int, fps: float, min_s: float, max_s: float,
                 video_path: str, mask_path: str) -> dict:
    """Render one video and its mask video; returns frame count, duration and nuisance draws."""
    ss = np.random.SeedSequence([seed, 1, item["surgeon"], item["trial"]])
    rng, nui = (np.random.default_rng(s) for s in ss.spawn(2))
    S, W = size, int(round(1.5 * size))
    phase, tint = nui.uniform(0, 2 * np.pi), nui.uniform(0.9, 1.1, 3)
    wound_x = lambda y: W / 2 + 0.03 * S * np.sin(5 * y / S + phase)
    stitch_y = W / 2 + (np.arange(NUM_STITCHES) - (NUM_STITCHES - 1) / 2) * 0.15 * S
    y_top, y_bot = stitch_y[0] - 0.2 * S, stitch_y[-1] + 0.2 * S
    anchor0 = np.array([wound_x(y_top + 0.05 * S) - 0.075 * S, y_top + 0.05 * S])
    sc = _Script(rng, item["latent"], S, W)
    sc.run(wound_x, stitch_y)
    frac = np.clip((sc.t - NATURAL_RANGE[0]) / (NATURAL_RANGE[1] - NATURAL_RANGE[0]), 0, 1)
    duration = min_s + (max_s - min_s) * frac
    F = max(1, int(round(duration * fps)))
    t_fin = np.arange(F) / fps
    t_scr = t_fin * sc.t / duration
    tools = {k: _sample(sc.keys[k], t_scr) for k in "LR"}
    m = item["latent"]["motion"]
    trem = {}
    for k in "LR":  # tremor: smoothed white noise, amplitude from motion skill
        tr = cv2.GaussianBlur(rng.standard_normal((F, 2)).astype(np.float32), (1, 3), 0, 0.7)
        trem[k] = tr / (tr.std() + 1e-6) * S * (0.004 + 0.045 * (1 - m) ** 1.3)
    n_t = np.array([t for t, _, _ in sc.needle_mode])
    n_mode = np.searchsorted(n_t, t_scr, side="right") - 1
    ang = np.array(sc.needle_angle)
    n_ang = np.interp(t_scr, ang[:, 0], ang[:, 1])
    cam_keys, t_c = [(0.0, W / 2, W / 2, 1.0, 0.0)], 0.0  # camera pans/zooms (nuisance)
    for t_mv in np.sort(nui.uniform(0, duration, nui.poisson(duration / 8.0))):
        t_c, d = max(t_mv, t_c), nui.uniform(0.8, 2.0)
        pan = W / 2 + nui.uniform(-0.12, 0.12, 2) * S
        cam_keys += [(t_c, *cam_keys[-1][1:4], 0.0), (t_c + d, *pan, nui.uniform(1.0, 1.3), 0.0)]
        t_c += d
    cam = _sample(cam_keys, t_fin)
    g0, per, ph = nui.uniform(0.85, 1.12), nui.uniform(6, 20), nui.uniform(0, 2 * np.pi)
    step_t, step_g = (nui.uniform(0, duration), nui.uniform(0.75, 1.2)) if nui.random() < 0.5 \
        else (np.inf, 1.0)
    light_tint = nui.uniform(0.93, 1.07, 3)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    vig = (255 * (1 - 0.3 * ((xx - S / 2) ** 2 + (yy - S / 2) ** 2) / (S / 2) ** 2 / 2))
    vig = np.repeat(np.clip(vig, 0, 255).astype(np.uint8)[..., None], 3, 2)
    marks = _tissue(nui, W, tint)
    ys = np.linspace(y_top, y_bot, 48)
    fourcc = cv2.VideoWriter_fourcc(*"MJPG")
    vw, mw = (cv2.VideoWriter(p, fourcc, fps, (S, S), True) for p in (video_path, mask_path))
    if not (vw.isOpened() and mw.isOpened()):
        raise RuntimeError(f"OpenCV cannot write MJPG video to {video_path}: install an OpenCV "
                           "build with video I/O (opencv-python-headless) or check the folder")
    grow, r_n = 1.0 * sc.t / duration, 0.075 * S
    for f in range(F):
        ts, (cx, cy, z) = t_scr[f], cam[f]
        to_img = lambda p: z * (np.asarray(p) - (cx, cy)) + S / 2
        for te, kind, data in sc.events:
            if kind == "blood" and te <= ts <= te + grow:
                r = data[1] * min(1.0, 0.3 + 0.7 * (ts - te) / grow)
                cv2.circle(marks, _pt(data[0]), int(16 * r), (35, 25, 150), -1, cv2.LINE_AA, 4)
                cv2.circle(marks, _pt(data[0]), int(8 * r), (20, 12, 105), -1, cv2.LINE_AA, 4)
            elif kind == "tear" and te <= ts < te + grow:
                cv2.line(marks, _pt(data[0]), _pt(data[0] + (data[1] - data[0]) * min(
                    1, (ts - te) / grow)), (30, 20, 120), max(1, S // 48), cv2.LINE_AA, 4)
        wf = marks.copy()
        done = [d for te, kind, d in sc.events if kind == "stitch" and te <= ts]
        gap = np.full_like(ys, 0.065 * S)
        for e, x, c in done:
            gap *= 1 - c * np.exp(-(((ys - (e[1] + x[1]) / 2) / (0.08 * S)) ** 2))
        gap *= np.minimum(1, np.minimum(ys - y_top, y_bot - ys) / (0.08 * S))
        wx = wound_x(ys)
        poly = np.concatenate([np.stack([wx - gap / 2, ys], 1),
                               np.stack([wx + gap / 2, ys], 1)[::-1]])
        cv2.fillPoly(wf, [np.int32(poly * 16)], (45, 30, 125), cv2.LINE_AA, 4)
        cv2.polylines(wf, [np.int32(poly * 16)], True, (70, 60, 150), 1, cv2.LINE_AA, 4)
        for e, x, _ in done:
            cv2.line(wf, _pt(e), _pt(x), (150, 45, 125), max(1, S // 64), cv2.LINE_AA, 4)
        M = np.array([[z, 0, S / 2 - z * cx], [0, z, S / 2 - z * cy]])
        img = cv2.warpAffine(wf, M, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        dx = np.zeros((S, S), np.float32)
        dy = np.zeros((S, S), np.float32)
        for t0, t1, c, d, amp in sc.deform:  # tissue pulled by needle and thread
            if t0 <= ts <= t1:
                cc, a = to_img(c), amp * S * z * np.sin(np.pi * (ts - t0) / (t1 - t0))
                g = a * np.exp(-((xx - cc[0]) ** 2 + (yy - cc[1]) ** 2) / (2 * (0.1 * S * z) ** 2))
                dx, dy = dx + g * d[0], dy + g * d[1]
        if dx.any():
            img = cv2.remap(img, (xx - dx).astype(np.float32), (yy - dy).astype(np.float32),
                            cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        mode, a0 = sc.needle_mode[n_mode[f]], n_ang[f]
        tips = {k: tools[k][f, :2] + trem[k][f] for k in "LR"}
        if mode[1] == "bite":
            centre = mode[2]
            tips["R"] = centre + r_n * _dir(a0 + NEEDLE_GRASP["R"] * np.pi) + trem["R"][f]
        else:
            centre = tips[mode[1]] - r_n * _dir(a0 + NEEDLE_GRASP[mode[1]] * np.pi)
        arc_a = a0 + np.linspace(0, np.pi, 24)
        arc = centre + r_n * _dir(arc_a).T
        vis = np.sin(arc_a) <= 0 if mode[1] == "bite" else np.ones(24, bool)  # under tissue
        anchor = done[-1][1] if done else anchor0
        tail, anc = to_img(arc[0]), to_img(anchor)
        mid = (tail + anc) / 2 + [0, 0.06 * S * z]
        thread = np.array([(1 - s) ** 2 * anc + 2 * s * (1 - s) * mid + s ** 2 * tail
                           for s in np.linspace(0, 1, 16)])
        cv2.polylines(img, [np.int32(thread * 16)], False, (150, 45, 125), max(1, S // 80),
                      cv2.LINE_AA, 4)
        runs = np.split(np.int32(to_img(arc) * 16), np.flatnonzero(np.diff(vis)) + 1)
        cv2.polylines(img, [r for r in runs[0 if vis[0] else 1::2] if len(r) > 1], False,
                      (205, 205, 215), max(1, round(0.014 * S * z)), cv2.LINE_AA, 4)
        mask = np.zeros((S, S), np.uint8)
        for k in "LR":
            _draw_tool(img, mask, to_img(tips[k]), to_img(sc.base[k]), tools[k][f, 2], S, z)
        gain = g0 * (1 + 0.06 * np.sin(2 * np.pi * t_fin[f] / per + ph)) * (
            1 + (step_g - 1) * np.clip(t_fin[f] - step_t, 0, 1))
        lut = np.clip(np.arange(256)[:, None] * gain * light_tint, 0, 255).astype(np.uint8)
        img = cv2.multiply(cv2.LUT(img, lut[:, None, :]), vig, scale=1 / 255)
        vw.write(img)
        mw.write(cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR))
    vw.release()
    mw.release()
    for p in (video_path, mask_path):
        cap = cv2.VideoCapture(p)
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        if n != F:
            raise RuntimeError(f"{p}: wrote {F} frames but OpenCV reads back {n}")
    return dict(num_frames=F, duration_s=round(F / fps, 4), natural_duration_s=round(sc.t, 4),
                stats=sc.stats, nuisance=dict(camera_moves=(len(cam_keys) - 1) // 2,
                                              lighting_step=bool(np.isfinite(step_t))))
