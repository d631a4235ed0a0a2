"""A small WikiText-like corpus the tests write themselves: train/valid/test.txt of generated sentences."""

import random
from pathlib import Path

_SYLLABLES = "ka lo mi ren sta vor el an tis bur ga ne ol pri dun ve sho ta ri mon".split()
_FUNCTION_WORDS = "the a of and to in is was for on that with as by at from his her it were".split()


def _sentence(rng: random.Random, words: list[str]) -> str:
    body = " ".join(rng.choice(words) for _ in range(rng.randint(4, 18)))
    if rng.random() < 0.2:
        body += f" @-@ {rng.randint(1800, 2020)}"
    if rng.random() < 0.1:
        body += " <unk>"
    return body + " ."


def sample_text(lines: int, seed: int) -> str:
    """WikiText-2-shaped text: ` = Title = ` headings, blank lines, ` @-@ ` and `<unk>` artefacts."""
    rng = random.Random(seed)
    nouns = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(120)]
    words = _FUNCTION_WORDS * 3 + nouns
    out = []
    for _ in range(lines):
        if rng.random() < 0.08:
            out.append(f" = {rng.choice(nouns).title()} = \n \n")
        out.append(" " + " ".join(_sentence(rng, words) for _ in range(rng.randint(1, 4))) + " \n")
    return "".join(out)


def write_text_corpus(folder: Path, train_lines: int = 400, names: tuple[str, str, str] = ("train.txt", "valid.txt",
                      "test.txt")) -> Path:
    """Write train (`train_lines` lines), valid and test files into `folder`; valid holds one 'é', unseen in train."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / names[0]).write_text(sample_text(train_lines, seed=0), encoding="utf-8")
    (folder / names[1]).write_text(sample_text(60, seed=1) + " café .\n", encoding="utf-8")
    (folder / names[2]).write_text(sample_text(60, seed=2), encoding="utf-8")
    return folder
