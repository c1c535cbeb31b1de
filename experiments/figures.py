"""Figure 1 of the paper, for any set of models: image | one Grad-CAM column per model, with the mask outline and
each map's maximum point."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def attribution_grid(images: np.ndarray, masks: np.ndarray, classes: np.ndarray, maps: dict[str, np.ndarray],
                     path: str, *, class_names=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     title: str = "Grad-CAM"):
    """Saves a grid with one row per image.

    Args:
      images: (N,S,S,3) normalised images (un-normalised with ``mean``/``std`` for display).
      masks: (N,S,S) int segmentation (0 background, c+1 class c).
      classes: (N,) the class attributed in each row.
      maps: column name (a model, a method) -> (N,K,S,S) maps; each row shows class ``classes[n]``.
      title: what the columns show, ahead of the legend in the figure's title.
    """
    rows, cols = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, 2.1 * rows), squeeze=False, layout="constrained")
    display = np.clip(images * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    for n in range(rows):
        target = masks[n] == classes[n] + 1
        name = class_names[classes[n]] if class_names is not None else f"class {classes[n]}"
        axes[n, 0].imshow(display[n])
        axes[n, 0].set_title(name, fontsize=8)
        for col, (model_name, model_maps) in enumerate(maps.items(), start=1):
            heat = model_maps[n, classes[n]]
            row, column = np.unravel_index(np.argmax(heat), heat.shape)
            hit = target[row, column]
            axes[n, col].imshow(display[n])
            axes[n, col].imshow(heat, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[n, col].plot(column, row, marker="o", markersize=7, markerfacecolor="none",
                              markeredgecolor="white" if hit else "red", markeredgewidth=2)
            if n == 0:
                axes[n, col].set_title(model_name, fontsize=8)
        for ax in axes[n]:
            ax.contour(target, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}: white line = object mask, circle = map maximum (white inside, red outside)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_grid(image: np.ndarray, mask: np.ndarray, target_class: int, maps: dict[str, dict[str, np.ndarray]],
                path: str, *, class_names=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
    """Saves one image's maps as a grid: one row per method, one column per model.

    Args:
      image: (S,S,3) normalised image; mask: (S,S) int segmentation (c+1 = class c).
      target_class: the class whose maps are shown.
      maps: method -> model name -> (K,S,S) maps (normalised to [0, 1]).
    """
    models = list(next(iter(maps.values())))
    rows, cols = len(maps), 1 + len(models)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.0 * rows), squeeze=False, layout="constrained")
    display = np.clip(image * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    target = mask == target_class + 1
    for row, (method, by_model) in enumerate(maps.items()):
        axes[row, 0].imshow(display)
        axes[row, 0].set_ylabel(method, fontsize=8)
        for col, name in enumerate(models, start=1):
            axes[row, col].imshow(display)
            axes[row, col].imshow(by_model[name][target_class], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            if row == 0:
                axes[row, col].set_title(name, fontsize=8)
        for ax in axes[row]:
            ax.contour(target, levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
    name = class_names[target_class] if class_names is not None else f"class {target_class}"
    fig.suptitle(f"Attribution methods x models for '{name}' (white line = object mask)", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
