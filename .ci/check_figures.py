"""After a book build: every chapter whose source draws a figure (plt.show) has at least one image in its HTML page.

Guards against a non-inline matplotlib backend in the build environment (e.g. an exported MPLBACKEND=Agg), with
which every page still builds without warnings but shows no figure.
"""

import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
missing = []
for src in sorted((root / "book").glob("*.py")):
    if "plt.show()" not in src.read_text():
        continue
    page = root / "_build" / "html" / "book" / f"{src.stem}.html"
    if not page.exists():
        missing.append(f"{src.name}: no page {page.relative_to(root)}")
    elif not re.search(r"<img[^>]+_images/", page.read_text()):
        missing.append(f"{src.name}: draws figures but its page has no image")
if missing:
    sys.exit("figures missing from the built book:\n  " + "\n  ".join(missing))
print("every chapter that draws figures shows them")
