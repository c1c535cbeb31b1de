"""experiments.vit_maps end to end at a tiny size (a few training steps of a narrow two-block ViT, a few localisation
images, three cheap methods, the table and the figure written), and its choice of methods."""

import json

import pytest

from experiments import vit_maps

TINY_MODEL = dict(width=32, depth=1, num_heads=2, mlp_dim=64, pool="gap")
METHODS = "gradcam,rollout,attnlrp"


def tiny_config():
    """3 training steps of batch 8 on a dataset of 56 images, 4 localisation images, Grad-CAM, rollout and
    AttnLRP on a one-block ViT (average pooling, so Grad-CAM reads its only block)."""
    config = vit_maps.vit_config(steps=3, images=4, model=TINY_MODEL, batch_size=8, methods=METHODS)
    config.data.update(dict(num_train=32, num_val=16, num_localization=8))
    return config


def test_run_writes_the_chosen_methods_and_the_figure(tmp_path):
    evidence, figure = tmp_path / "evidence", tmp_path / "figure.png"
    result = vit_maps.run(tiny_config(), str(tmp_path / "work"), str(evidence), str(figure))

    columns = ["gradcam@block0", "attnlrp", "rollout"]
    assert result["steps"] == 3 and result["localization_images"] == 4
    assert list(result["methods"]) == columns
    assert all("error" not in summary for summary in result["methods"].values())
    assert set(json.loads((evidence / "results.json").read_text())["methods"]) == set(columns)
    table = (evidence / "results.md").read_text()
    for column in columns:
        assert f"| {column} |" in table
    assert figure.stat().st_size > 0


def test_gradcam_skips_the_last_block_when_only_the_class_token_reaches_the_head():
    gap = vit_maps.make_vit(vit_maps.vit_config(steps=1, images=1, model=dict(depth=4, pool="gap")))
    token = vit_maps.make_vit(vit_maps.vit_config(steps=1, images=1, model=dict(depth=4, pool="token")))

    assert [c for c in vit_maps.method_columns(gap) if c.startswith("gradcam")] == ["gradcam@block3", "gradcam@block2"]
    assert [c for c in vit_maps.method_columns(token) if c.startswith("gradcam")] == ["gradcam@block2",
                                                                                      "gradcam@block1"]
    assert list(vit_maps.selected_columns(token, "rollout, gradcam@block1")) == ["gradcam@block1", "rollout"]
    with pytest.raises(ValueError, match="unknown methods"):
        vit_maps.selected_columns(token, "gradcam@block3")


def test_command_line_defaults():
    args = vit_maps.parse_args(["--workdir", "w", "--steps", "7", "--methods", "rollout"])
    assert (args.steps, args.images, args.methods) == (7, vit_maps.DEFAULT_IMAGES, "rollout")
