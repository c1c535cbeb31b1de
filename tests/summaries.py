"""Comparing evaluation summaries computed two ways (devices, processes) that agree to float32 rounding."""

import chex


def assert_summaries_close(actual: dict, expected: dict, *, rtol: float, auc_rtol: float) -> None:
    """Every entry within ``rtol``, but the mask / faithfulness AUCs within ``auc_rtol``: an AUC ranks pixels, and
    a rounding difference can swap two pixels of a near-flat min-max normalised map."""
    chex.assert_trees_all_equal_structs(actual, expected)
    aucs = [key for key in expected if "auc" in key and not key.endswith("_excluded")]
    chex.assert_trees_all_close({key: actual[key] for key in aucs}, {key: expected[key] for key in aucs},
                                rtol=auc_rtol)
    chex.assert_trees_all_close({key: value for key, value in actual.items() if key not in aucs},
                                {key: value for key, value in expected.items() if key not in aucs}, rtol=rtol)
