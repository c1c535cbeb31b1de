"""experiments.vit_maps end to end at a tiny size: a few training steps, a few localisation images, every method in
the table and the figure written."""

import json

from experiments import vit_maps


def tiny_config():
    """5 training steps, 8 localisation images, a dataset of a hundred images, two integrated-gradients steps."""
    config = vit_maps.vit_config(steps=5, images=8)
    config.data.update(dict(num_train=64, num_val=32, num_localization=8))
    config.eval.method_options["integrated_gradients"]["steps"] = 2
    return config


def test_run_writes_every_method_and_the_figure(tmp_path):
    evidence, figure = tmp_path / "evidence", tmp_path / "figure.png"
    result = vit_maps.run(tiny_config(), str(tmp_path / "work"), str(evidence), str(figure))

    assert result["steps"] == 5 and result["localization_images"] == 8
    assert set(result["methods"]) == set(vit_maps.METHODS)
    assert json.loads((evidence / "results.json").read_text())["methods"].keys() == vit_maps.METHODS.keys()
    table = (evidence / "results.md").read_text()
    for column in vit_maps.METHODS:
        assert f"| {column} |" in table
    assert figure.stat().st_size > 0


def test_command_line_defaults():
    args = vit_maps.parse_args(["--workdir", "w", "--steps", "7"])
    assert (args.steps, args.images) == (7, vit_maps.DEFAULT_IMAGES)
