"""The search behind the 3-D toy's setting (conf/task/toy3d.yaml, toy3d_wd.yaml).

The project page shows its 3-D toy (Rosenbrock on a hemisphere, the radius a redundant axis) only
as three figures: GD + momentum, GD + weight decay, GD + projection, each a trajectory in
(psi, phi) over contours and r = ||w|| per iteration. This script reads those figures and searches
for a setting that reproduces them:

    python scripts/toy3d_search.py                  # from results/toy3d_page.json (digitised figure)
    python scripts/toy3d_search.py --digitise DIR   # first re-read the page's svgs from DIR (the
                                                    # static/img of clovaai/AdamP's gh-pages branch)

It prints, in order (numbers in the README come from a run of it):
1. what the figure fixes: b = 300 (the contour levels are iso-lines of (1-psi)^2 + b(phi-psi^2)^2
   only for b = 300; with --digitise), start (-2, 2) at r = 1, 200 iterations, the final radii;
2. the first step of each panel: all three lie on one curve at different lengths, so the panels
   were run with different step sizes (or decays);
3. the radius relation: at the lr where GD + momentum 0.9 ends at r = 3.16, SGDP as the paper's
   Algorithm 1 ends near 1.13 and the official form near 1.19, whatever the chart;
4. a search over gnomonic charts w ~ (s (psi - psi_c), s (phi - phi_c), 1), the lr of each set so
   that GD + momentum ends at 3.16, ranked by the distance of both trajectories and r curves to
   the page's; and the chart the toy uses;
5. the weight decay for which the decay panel ends at the page's r = 0.84.

The simulation is numpy, all settings at once, the same update as torch.optim.SGD (coupled decay)
and projbench's SGDP (tests/test_toy.py runs the chosen setting through the real loop).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

PAGE = Path(__file__).resolve().parent.parent / "results" / "toy3d_page.json"
PANELS = {"gd_momentum": "sgd_3d_toy", "gd_momentum_wd": "sgd_wd_3d_toy", "gd_projection": "sgdp_3d_toy"}
B = 300.0
STEPS = 200
CHOSEN = dict(scale=1.0, center=(0.5, 1.0))  # conf/task/toy3d.yaml task.chart


# -- reading the page's figures -----------------------------------------------------------------
def _paths(svg: str) -> list[tuple[str, str, str]]:
    """(style, d, transform) of every <path> of a cairo-written svg."""
    out = []
    for attrs in re.findall(r"<path ([^>]*)/>", svg):
        style = re.search(r'style="([^"]*)"', attrs)
        d = re.search(r' d="([^"]*)"', attrs)
        transform = re.search(r'transform="([^"]*)"', attrs)
        if style and d:
            out.append((style.group(1), d.group(1), transform.group(1) if transform else ""))
    return out


def _points(d: str) -> np.ndarray:
    return np.array([(float(x), float(y)) for x, y in re.findall(r"[MLC] ([-\d.]+) ([-\d.]+)", d)])


def digitise(svg_path: Path) -> tuple[dict, list[np.ndarray]]:
    """One panel: its markers in (psi, phi), its r curve, and its contour lines in (psi, phi)."""
    paths = _paths(svg_path.read_text())
    frames = [_points(d) for style, d, _ in paths if "stroke:rgb(14.99939%" in style]
    xs = sorted({p for f in frames for p in f[:, 0]})
    ys = sorted({p for f in frames for p in f[:, 1]})
    x0, x1 = xs[0], xs[-1]
    (r0, r1), (m0, m1) = [y for y in ys if y < 200], [y for y in ys if y > 200]  # r axes, main axes
    markers, r_curve, contours = [], None, []
    for style, d, transform in paths:
        if "stroke:rgb(100%,0%,0%)" in style and transform.startswith("matrix") and not transform.endswith(",0,720)"):
            a = [float(v) for v in transform[7:-1].split(",")]
            markers.append((a[4], 720 - a[5]))  # the page's svgs flip y about 720
        elif "stroke:rgb(0%,0%,100%)" in style and "linecap:round" in style:
            r_curve = _points(d)
        elif "fill:none" in style and "stroke:rgb(" in style and "100%,0%,0%" not in style \
                and "14.99939%" not in style and "stroke:rgb(0%,0%,100%)" not in style:
            contours.append(_points(d))
    to_psi = lambda x: -2 + 4 * (x - x0) / (x1 - x0)  # noqa: E731 (axes -2..2 and -1..3)
    to_phi = lambda y: -1 + 4 * (y - m0) / (m1 - m0)  # noqa: E731
    traj = [[to_psi(x), to_phi(y)] for x, y in markers]
    r = [[-10 + 220 * (x - x0) / (x1 - x0), 4 * (y - r0) / (r1 - r0)] for x, y in r_curve]  # x: -10..210, y: 0..4
    lines = [np.stack([to_psi(c[:, 0]), to_phi(c[:, 1])], 1) for c in contours]
    return {"trajectory": np.round(traj, 5).tolist(), "r": np.round(r, 5).tolist()}, lines


def rosenbrock(psi, phi, b=B):
    return (1 - psi) ** 2 + b * (phi - psi**2) ** 2


def contour_b(lines: list[np.ndarray]) -> float:
    """The b for which the figure's contour lines are iso-lines (least relative spread)."""
    bs = np.arange(50.0, 1001.0, 10.0)
    spread = [np.mean([rosenbrock(l[:, 0], l[:, 1], b).std() / rosenbrock(l[:, 0], l[:, 1], b).mean()
                       for l in lines]) for b in bs]
    return float(bs[int(np.argmin(spread))])


def load_page() -> dict:
    page = json.loads(PAGE.read_text())["panels"]
    out = {}
    for name, panel in page.items():
        traj = np.array(panel["trajectory"])[1:]  # the first marker is drawn twice
        r = np.array(panel["r"])
        out[name] = (traj, np.interp(np.arange(STEPS + 1), r[:, 0], r[:, 1]) - (r[0, 1] - 1.0))
    return out


# -- the toy, simulated for many settings at once -----------------------------------------------
def _grad_f(psi, phi):
    return -2 * (1 - psi) - 4 * B * psi * (phi - psi**2), 2 * B * (phi - psi**2)


def gnomonic(scale, center):
    """(coords(w), grad(w), start) of the chart w ~ (s (psi - psi_c), s (phi - phi_c), 1)."""
    p0, q0 = center

    def coords(w):
        return w[..., 0] / (w[..., 2] * scale) + p0, w[..., 1] / (w[..., 2] * scale) + q0

    def grad(w):
        x, y, z = w[..., 0], w[..., 1], w[..., 2]
        fu, fv = _grad_f(*coords(w))
        fu, fv = fu / scale, fv / scale
        return np.stack([fu / z, fv / z, -(fu * x + fv * y) / z**2], -1)

    start = np.stack([scale * (-2 - p0), scale * (2 - q0), np.ones_like(scale * p0)], -1)
    return coords, grad, start / np.linalg.norm(start, axis=-1, keepdims=True)


def latlon(scale, lat0):
    """(coords, grad, start) of longitude = s psi, latitude = s phi + lat0."""
    def coords(w):
        x, y, z = w[..., 0], w[..., 1], w[..., 2]
        return np.arctan2(y, x) / scale, (np.arctan2(z, np.hypot(x, y)) - lat0) / scale

    def grad(w):
        x, y, z = w[..., 0], w[..., 1], w[..., 2]
        rho2 = x * x + y * y
        fu, fv = _grad_f(*coords(w))
        d_lon = np.stack([-y / rho2, x / rho2, np.zeros_like(x)], -1)
        d_lat = np.stack([-x * z, -y * z, rho2], -1) / ((rho2 + z * z) * np.sqrt(rho2))[..., None]
        return (fu / scale)[..., None] * d_lon + (fv / scale)[..., None] * d_lat

    lon, lat = -2 * scale, 2 * scale + lat0
    start = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat) * np.ones_like(lon)], -1)
    return coords, grad, start


def simulate(chart, lr, form="sgd", momentum=0.9, weight_decay=0.0):
    """Trajectories (..., 201, 2) and radii (..., 201). form: sgd (torch SGD, coupled decay),
    official (SGDP projecting its buffer), alg1 (SGDP as Algorithm 1)."""
    coords, grad, w = chart
    lr = np.asarray(lr, float)[..., None]
    buf, ws = None, [w]
    with np.errstate(all="ignore"):
        for _ in range(STEPS):
            g = grad(w) + (weight_decay * w if form == "sgd" else 0.0)
            buf = g if buf is None else momentum * buf + g
            if form == "sgd":
                w = w - lr * buf
                ws.append(w)
                continue
            unit = w / np.linalg.norm(w, axis=-1, keepdims=True)
            update = buf - unit * (unit * buf).sum(-1, keepdims=True)
            if form == "official":
                buf = update
            w = w - lr * update
            ws.append(w)
    ws = np.stack(ws)  # (201, ..., 3): the chart's per-setting arrays broadcast over the steps
    traj = np.moveaxis(np.stack(coords(ws), -1), 0, -2)
    return traj, np.moveaxis(np.linalg.norm(ws, axis=-1), 0, -1)


def lr_for_radius(chart, target=3.162, lo=1e-8, hi=1e-3, iters=40):
    """Per setting, the lr at which GD + momentum ends at radius `target` (bisection in log lr)."""
    shape = chart[2].shape[:-1]
    lo, hi = np.full(shape, np.log(lo)), np.full(shape, np.log(hi))
    for _ in range(iters):
        mid = (lo + hi) / 2
        r = simulate(chart, np.exp(mid))[1][..., -1]
        above = ~np.isfinite(r) | (r > target)
        hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
    return np.exp((lo + hi) / 2)


def distance(traj, page_traj, steps=STEPS):
    """Mean distance in (psi, phi) over the first `steps` iterates (the page's figure stops at w_199)."""
    return np.sqrt(((traj[..., :steps, :] - page_traj[:steps]) ** 2).sum(-1)).mean(-1)


# -- the report -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digitise", metavar="DIR", help="re-read the page's svgs and rewrite results/toy3d_page.json")
    args = parser.parse_args()
    np.set_printoptions(precision=4, suppress=True)

    print("1. The page's figure")
    if args.digitise:
        panels, bs = {}, []
        for name, stem in PANELS.items():
            panels[name], lines = digitise(Path(args.digitise) / f"{stem}.svg")
            bs.append(contour_b(lines))
        PAGE.write_text(json.dumps({**json.loads(PAGE.read_text()), "panels": panels}, separators=(",", ":")))
        print(f"   contour levels are iso-lines of Rosenbrock with b = {bs} (wrote {PAGE.name})")
    page = load_page()
    for name, (traj, r) in page.items():
        print(f"   {name:15s} start {traj[0]} end {traj[-1]}  r: max {r.max():.3f} at {r.argmax()}, final {r[-1]:.3f}")

    print("2. First steps (psi, phi): one curve, three lengths, so three step sizes")
    for name, (traj, r) in page.items():
        print(f"   {name:15s} {traj[1] - traj[0]}  r after it {r[1]:.5f}")
    gd, proj = (page[k][0][1, 0] - page[k][0][0, 0] for k in ("gd_momentum", "gd_projection"))
    print(f"   projection / GD first step: {proj / gd:.2f}")

    print("3. At the lr where GD + momentum 0.9 ends at r = 3.16, per chart: SGDP's final r")
    charts = {**{f"gnomonic s={s} centre (0, 0)": gnomonic(np.array([s]), (0.0, 0.0)) for s in (0.5, 1.0, 2.0)},
              **{f"gnomonic s=1 centre {c}": gnomonic(np.array([1.0]), c) for c in ((0.5, 1.0), (1.0, 1.0))},
              **{f"lat/lon s={s} lat0={l0}": latlon(np.array([s]), l0) for s, l0 in ((0.3, -0.3), (0.5, -0.5))}}
    for name, chart in charts.items():
        lr = lr_for_radius(chart)
        radii = {form: simulate(chart, lr, form)[1][..., -1][0] for form in ("alg1", "official")}
        print(f"   {name:30s} lr {lr[0]:.3g}: Algorithm 1 {radii['alg1']:.3f}, official {radii['official']:.3f}")

    print("4. Gnomonic charts (scale s, centre), ranked by distance to the page (GD and projection panels)")
    s, p0, q0 = np.meshgrid(np.exp(np.linspace(np.log(0.2), np.log(3.0), 15)), np.linspace(-2, 2, 17),
                            np.linspace(-1, 4, 21), indexing="ij")
    s, p0, q0 = s.ravel(), p0.ravel(), q0.ravel()
    chart = gnomonic(s, (p0, q0))
    lr = lr_for_radius(chart)
    (gd_traj, gd_r), (p_traj, p_r) = (simulate(chart, lr, form) for form in ("sgd", "alg1"))
    (page_gd, page_gd_r), (page_p, page_p_r) = page["gd_momentum"], page["gd_projection"]
    early = distance(gd_traj, page_gd, 20) + distance(p_traj, page_p, 20)
    full = distance(gd_traj, page_gd) + distance(p_traj, page_p)
    r_err = np.abs(gd_r - page_gd_r).mean(-1) + np.abs(p_r - page_p_r).mean(-1)
    ok = np.isfinite(full + r_err) & (np.abs(gd_r[:, -1] - 3.162) < 0.03)
    for label, score in (("whole trajectories", full + 2 * r_err), ("first 20 iterations", early + r_err)):
        print(f"   best by {label}:")
        for i in np.argsort(np.where(ok, score, np.inf))[:4]:
            print(f"     s {s[i]:.2f} centre ({p0[i]:.2f}, {q0[i]:.2f}) lr {lr[i]:.3g}: distance {full[i]:.2f} "
                  f"(first 20: {early[i]:.2f}), r error {r_err[i]:.3f}; GD ends {gd_traj[i, -1]}, "
                  f"Algorithm 1 ends {p_traj[i, -1]} at r {p_r[i, -1]:.3f}")
    chosen = gnomonic(np.array([CHOSEN["scale"]]), CHOSEN["center"])
    lr = lr_for_radius(chosen)
    (c_gd, c_gd_r), (c_p, c_p_r) = (simulate(chosen, lr, form) for form in ("sgd", "alg1"))
    print(f"   chosen (conf/task/toy3d.yaml), among the best by whole trajectories, with end points nearest the page's:\n"
          f"     s {CHOSEN['scale']} centre {CHOSEN['center']} lr {lr[0]:.4g}: distance "
          f"{(distance(c_gd, page_gd) + distance(c_p, page_p))[0]:.2f} "
          f"(first 20: {(distance(c_gd, page_gd, 20) + distance(c_p, page_p, 20))[0]:.2f}), r error "
          f"{(np.abs(c_gd_r - page_gd_r).mean(-1) + np.abs(c_p_r - page_p_r).mean(-1))[0]:.3f}")
    for form in ("sgd", "official", "alg1"):
        traj, r = simulate(chosen, lr, form)
        print(f"     {form:8s} final r {r[0, -1]:.3f}, ends {traj[0, -1]}")
    slower = {form: simulate(chosen, 0.8 * lr, form)[1][0, -1] for form in ("official", "alg1")}
    print(f"     at 0.8 times that lr (the page's projection / GD first steps): official {slower['official']:.3f}, "
          f"Algorithm 1 {slower['alg1']:.3f}")

    print("5. Weight decay (coupled, same lr) for the page's decay panel: final r 0.84")
    decays = np.linspace(50.0, 120.0, 71)
    traj, r = simulate(gnomonic(np.full(decays.shape, CHOSEN["scale"]), CHOSEN["center"]), np.full(decays.shape, lr[0]),
                       "sgd", weight_decay=decays[:, None])
    best = int(np.argmin(np.abs(r[:, -1] - 0.836)))
    page_wd_r = page["gd_momentum_wd"][1]
    print(f"   weight_decay {decays[best]:.0f}: final r {r[best, -1]:.3f}, max {r[best].max():.2f} at {r[best].argmax()} "
          f"(page {page_wd_r.max():.2f} at {page_wd_r.argmax()}), ends {traj[best, -1]}")


if __name__ == "__main__":
    main()
