"""Zero-shot prompt pairs: normal classes get a normal-vs-abnormal pair, double negatives are refused
(field case 08)."""

from __future__ import annotations

import pytest

from g2d.errors import DataError


@pytest.mark.parametrize("prompts", [None, "biovil"])
def test_normal_classes_get_a_normal_vs_abnormal_pair(prompts):
    from g2d.inference.zeroshot import class_prompts, load_prompts

    pr = class_prompts(["No Finding", "normal", "Support Devices", "Pneumonia"], load_prompts(prompts))
    for cls in ("No Finding", "normal"):
        for pos, neg in pr[cls]:
            assert "no no" not in neg and "no normal" not in neg and pos != neg
            assert "abnormal" in neg or "acute" in neg
    assert pr["Pneumonia"][0][1].endswith("pneumonia")


def test_prompt_builder_refuses_double_negatives(tmp_path):
    from g2d.inference.zeroshot import class_prompts, load_prompts

    generic = {"*": [("{finding}", "no {finding}")]}
    for cls in ("No Finding", "normal", "no_acute_disease"):
        with pytest.raises(DataError, match=f"class '{cls}'.*double negative"):
            class_prompts([cls], generic)
    own = tmp_path / "p.txt"
    own.write_text("*\t{finding}\tno {finding}\nclear\tclear lungs\tclear lungs\n")
    with pytest.raises(DataError, match="class 'clear'.*the same"):
        class_prompts(["clear"], load_prompts(own))
    own.write_text("*\t{finding}\tno {finding}\nedema\tedema\tnot without edema\n")
    with pytest.raises(DataError, match="class 'edema'.*double negative"):
        class_prompts(["edema"], load_prompts(own))
