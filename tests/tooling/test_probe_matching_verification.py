"""scripts/probe_matching_verification.py: the numbers docs/pretraining.md quotes come from it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.support.processes import run_with_deadline
from rematch.world.pretrain_corpus import VERIFY_PROMPT, heldout_examples
from tests.support import REPO

SCRIPT = REPO / "scripts" / "probe_matching_verification.py"


def test_the_probe_scores_true_captions_and_foils_of_the_shipped_model_in_the_matching_layout():
    result = run_with_deadline([sys.executable, str(SCRIPT), "--scenes", "3"], timeout=300,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout.decode())
    assert report["model"] == "tiny-pretrained" and report["captions"] == {"true": 3, "foils": 3}
    assert 0.0 <= report["separation_auc"] <= 1.0
    assert all(0.0 < p < 1.0 for p in report["mean_yes_probability"].values())


def test_the_probe_reads_back_the_caption_each_verification_prompt_was_made_from():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from probe_matching_verification import caption_of
    finally:
        sys.path.remove(str(SCRIPT.parent))
        sys.modules.pop("probe_matching_verification", None)
    verifications = [example for example in heldout_examples(4) if example.task == "verify"]
    for example in verifications:
        caption = caption_of(example)
        assert caption and VERIFY_PROMPT.format(caption=caption) == example.prompt
