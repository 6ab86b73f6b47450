"""What both benchmarks share: where the checkout and the corpus are, ACE-Step 1.5 through the
registry, and its real sample dimensions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("ACESTEP_CORPUS", ROOT.parent / "shared" / "corpus"))
sys.path.insert(0, str(ROOT))

from acestep_dist.families import get as get_family  # noqa: E402

ACE15 = get_family("ace-step-1.5")
REAL_LATENT_DIM, REAL_TEXT_DIM, FRAMES_PER_SECOND = 64, 1024, 25


def pack_tensors(latent_mean, latent_std, text_states, lyric_ids, **optional) -> bytes:
    """An ACE-Step 1.5 sample blob, as its schema packs it (``optional``: e.g. condition_states)."""
    return ACE15.schema.pack({"latent_mean": latent_mean, "latent_std": latent_std, "text_states": text_states,
                              "lyric_ids": lyric_ids, **optional})
