"""METEOR and CIDEr as the E2E challenge's official scorer computes them: with the MS-COCO caption-evaluation code
(`pycocoevalcap`, the optional extra `pip install 'lorakit[coco]'`), which needs a Java runtime.

As the E2E scorer does: references and predictions first go through the Stanford PTB tokenizer (a Java jar: it
lower-cases and the punctuation is dropped); METEOR 1.5 (`meteor-1.5.jar -l en -norm`, with its paraphrase
table) scores the corpus against every reference of each input; CIDEr (COCO's CIDEr-D: 1- to 4-grams, Gaussian
length penalty with sigma 6, document frequencies from the scored references) likewise. METEOR is reported
0-100 as the LoRA paper does, CIDEr as is (about 0-10).

Each scoring call runs the tokenizer jar once and the METEOR jar once (it takes 10-20 s to load its paraphrase
table), whatever the corpus size; nothing is kept between calls. SPICE, which downloads models, is not used.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from collections.abc import Collection, Sequence
from typing import Any

from .base import MetricUnavailable, Scored

PACKAGE = "pycocoevalcap"
JAVA = "java"


def unavailable() -> str | None:
    """Why METEOR and CIDEr cannot run here, or None when they can."""
    if importlib.util.find_spec(PACKAGE) is None:
        return f"needs the {PACKAGE} package: pip install 'lorakit[coco]'"
    if shutil.which(JAVA) is None:
        return "needs a Java runtime (no `java` on PATH; e.g. apt-get install default-jre-headless)"
    return None


def ptb_tokenized(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(references, predictions) by item, PTB-tokenized in one run of the tokenizer, as COCO's scorers take them."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions: dict[Any, list[dict[str, str]]] = {}
    for i, (hypothesis, group) in enumerate(zip(hypotheses, references)):
        captions[("prediction", i)] = [{"caption": hypothesis}]
        captions[("reference", i)] = [{"caption": reference} for reference in group]
    tokens = PTBTokenizer().tokenize(captions)
    items = range(len(hypotheses))
    return {i: tokens[("reference", i)] for i in items}, {i: tokens[("prediction", i)] for i in items}


def meteor(references: dict[int, list[str]], predictions: dict[int, list[str]]) -> float:
    """Corpus METEOR from one run of the jar, 0-100. A jar that fails is MetricUnavailable."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return 100 * float(scorer.compute_score(references, predictions)[0])
    except (OSError, ValueError) as err:  # the process died: a broken pipe, or no number to read back
        raise MetricUnavailable(f"the METEOR jar failed ({type(err).__name__}: {err})") from None
    finally:
        # Stop the jar now, and leave its lock free: the wrapper's __del__ takes it (after a failure it is held).
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        if scorer.lock.locked():
            scorer.lock.release()


def cider(references: dict[int, list[str]], predictions: dict[int, list[str]]) -> float:
    from pycocoevalcap.cider.cider import Cider

    return float(Cider().compute_score(references, predictions)[0])


def coco_scores(scored: Scored, names: Collection[str]) -> dict[str, float]:
    """meteor and cider (those named) of generated texts; MetricUnavailable when they cannot run here."""
    scored.checked(texts=True)
    reason = unavailable()
    if reason is not None:
        raise MetricUnavailable(reason)
    try:
        references, predictions = ptb_tokenized(scored.predictions, scored.references)
    except (OSError, subprocess.SubprocessError, KeyError) as err:  # KeyError: the jar returned fewer lines
        raise MetricUnavailable(f"the PTB tokenizer jar failed ({type(err).__name__}: {err})") from None
    scores = {}
    if "meteor" in names:
        scores["meteor"] = meteor(references, predictions)
    if "cider" in names:
        scores["cider"] = cider(references, predictions)
    return scores
