"""Draw ``docs/_static/upgrad.png``: two conflicting gradients, their mean and UPGrad.

Run ``python docs/make_figure.py`` (matplotlib, Agg backend; no display needed). The figure
shows, in 2-D, the dual cone ``{x : <g1, x> >= 0 and <g2, x> >= 0}`` (the directions that
increase neither objective), the mean of the two gradients (outside the cone: it conflicts
with ``g2``) and the UPGrad aggregation (inside the cone: it conflicts with neither).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from jdoptim.aggregation import UPGrad  # noqa: E402

OUT = Path(__file__).parent / "_static" / "upgrad.png"


def boundary_ray(g: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Unit vector orthogonal to ``g`` on the side where ``<other, x> >= 0``."""
    r = torch.stack([-g[1], g[0]])
    r = r if float(other @ r) >= 0 else -r
    return r / r.norm()


def main(path: Path = OUT) -> Path:
    J = torch.tensor([[4.0, 0.5], [-1.0, 1.2]], dtype=torch.float64)
    g1, g2 = J
    mean = J.mean(dim=0)
    upgrad = UPGrad()(J)
    assert float(mean @ g2) < 0  # the mean conflicts with g2
    assert bool((J @ upgrad >= 0).all())  # UPGrad conflicts with neither

    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=150)
    radius = 6.0
    r1, r2 = boundary_ray(g1, g2), boundary_ray(g2, g1)
    cone = [
        (0.0, 0.0),
        tuple((radius * r1).tolist()),
        tuple((radius * (r1 + r2)).tolist()),
        tuple((radius * r2).tolist()),
    ]
    ax.add_patch(plt.Polygon(cone, closed=True, color="tab:green", alpha=0.15, lw=0))
    for r in (r1, r2):
        ax.plot([0, radius * r[0]], [0, radius * r[1]], color="tab:green", lw=0.8, ls=":")
    ax.text(0.55, 3.3, "dual cone:\nconflicts with\nno gradient", color="darkgreen", fontsize=9)

    def arrow(v: torch.Tensor, color: str, label: str, offset: tuple[float, float]) -> None:
        ax.annotate(
            "",
            xy=(float(v[0]), float(v[1])),
            xytext=(0, 0),
            arrowprops={"arrowstyle": "-|>", "color": color, "lw": 2.2, "mutation_scale": 16},
        )
        ax.text(
            float(v[0]) + offset[0],
            float(v[1]) + offset[1],
            label,
            color=color,
            fontsize=11,
            fontweight="bold",
        )

    arrow(g1, "tab:blue", "$g_1$", (0.1, -0.35))
    arrow(g2, "tab:blue", "$g_2$", (-0.45, 0.1))
    arrow(mean, "tab:red", "mean\n(conflicts with $g_2$)", (0.1, 0.05))
    arrow(upgrad, "black", "UPGrad\n(conflicts with neither)", (0.1, 0.1))

    ax.set_xlim(-1.8, 4.6)
    ax.set_ylim(-0.6, 4.0)
    ax.set_aspect("equal")
    ax.axhline(0, color="grey", lw=0.5)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Two conflicting gradients: their mean vs. UPGrad")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(main())
