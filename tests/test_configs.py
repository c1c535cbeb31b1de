"""Every preset in experiments/configs validates: each run's model, optimizer, objective, layers and pruning settings
are checked without training (structured rates by pruning a freshly initialised teacher)."""

import os

import pytest

from experiments import configuration, demo

PRESETS = sorted(name[:-3] for name in os.listdir(os.path.join(os.path.dirname(configuration.__file__), "configs"))
                 if name.endswith(".py") and not name.startswith("_"))


def test_the_presets_are_the_documented_ones():
    assert PRESETS == ["birds", "paper", "paper_resnet", "pet", "quick", "quick_resnet"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(name):
    demo.validate(configuration.load_config(name))
