"""METEOR and CIDEr against the MS-COCO caption-evaluation code called directly, as the E2E challenge's scorer
calls it (references and predictions PTB-tokenized apart, then each scorer). Needs the optional pycocoevalcap
package and a Java runtime; skipped without them. Slow: the METEOR jar takes 10-20 s to start, and runs twice."""

import shutil

import pytest

from lorakit.metrics import Scored, score
from lorakit.train.data import GENERATION

pytest.importorskip("pycocoevalcap")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need a Java runtime"),
]

HYPS = ["The Vaults is a pub, near the river.", "Green Man serves English food.", "a family friendly coffee shop"]
REFS = [
    ["The Vaults pub is by the river.", "Near the river there's a pub called The Vaults."],
    ["The Green Man serves English food."],
    ["There is a cheap, family-friendly coffee shop.", "A coffee shop for families.", "Coffee shop, kids welcome."],
]


def reference_scores() -> tuple[float, float]:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in group] for i, group in enumerate(REFS)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(HYPS)})
    meteor = Meteor()
    meteor_score = meteor.compute_score(gts, res)[0]
    del meteor  # stops the jar
    return meteor_score, Cider().compute_score(gts, res)[0]


def test_meteor_and_cider_equal_pycocoevalcaps_own():
    result = score(GENERATION, Scored(HYPS, REFS), ["meteor", "cider", "bleu"])
    assert result.skipped == {}
    meteor, cider = reference_scores()
    assert result.metrics["meteor"] == pytest.approx(100 * meteor, abs=1e-9)  # reported 0-100, as the LoRA paper
    assert result.metrics["cider"] == pytest.approx(cider, abs=1e-9)
    assert result.implementations["meteor"].startswith("pycocoevalcap 1.2: METEOR 1.5")
