"""Where the shared test data lives: `<repo's parent>/shared/data`, beside the checkout."""

from pathlib import Path

SHARED_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA_DIR / "tinyshakespeare" / "input.txt"
