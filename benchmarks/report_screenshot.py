"""Opens an `evaluate --report` HTML file in headless Chromium and screenshots it.

  python benchmarks/report_screenshot.py REPORT.html OUT_DIR \
      [--chromium=/usr/bin/chromium] [--patients=2]

Writes into OUT_DIR:
  report_top.png        the header and the start of the cohort summary
                        (1300 px wide, 1800 px high);
  report_<id>.png       the whole section of each of the first --patients
                        patients;
  report_check.json     what the browser saw: the requests other than the file
                        itself and data: URIs (must be none: the report is
                        self-contained), the images and how many decoded, the
                        patient sections, the rows marked out of tolerance,
                        the page height, and the machine.

Exits 1 when the page fetched anything, or an image did not decode. The
structure of the HTML is checked by tests/test_report.py; this script is for
people (and for the screenshots in the README / NOTES).

Needs playwright (`pip install playwright`; its Python package drives a
Chromium already installed, e.g. Debian's `chromium`: no browser download).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import common  # noqa: E402


def _chromium(path: str | None) -> str:
  for candidate in (
      path,
      shutil.which("chromium"),
      shutil.which("chromium-browser"),
      shutil.which("google-chrome"),
  ):
    if candidate:
      return candidate
  raise SystemExit(
      "no Chromium found: install one (Debian: apt-get install chromium) or "
      "pass --chromium=PATH"
  )


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("report", type=pathlib.Path)
  parser.add_argument("out_dir", type=pathlib.Path)
  parser.add_argument("--chromium", default=None)
  parser.add_argument("--patients", type=int, default=2)
  args = parser.parse_args()
  if not args.report.is_file():
    raise SystemExit(f"{args.report}: report not found")
  from playwright.sync_api import sync_playwright  # pylint: disable=g-import-not-at-top

  args.out_dir.mkdir(parents=True, exist_ok=True)
  url = args.report.resolve().as_uri()
  fetched = []
  with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path=_chromium(args.chromium),
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    page = browser.new_page(viewport={"width": 1300, "height": 1800})
    page.on(
        "request",
        lambda r: fetched.append(r.url)
        if r.url != url and not r.url.startswith("data:")
        else None,
    )
    page.goto(url, wait_until="load")
    seen = page.evaluate("""() => ({
          images: document.images.length,
          decoded: [...document.images].filter(
              i => i.complete && i.naturalWidth > 0).length,
          sections: [...document.querySelectorAll('section.patient')].map(
              s => s.id),
          out_rows: document.querySelectorAll('tr.out').length,
          height: document.documentElement.scrollHeight,
          title: document.title,
        })""")
    shots = [args.out_dir / "report_top.png"]
    page.screenshot(path=shots[0])
    for section in seen["sections"][: args.patients]:
      shot = args.out_dir / f"report_{section}.png"
      page.locator(f"#{section}").screenshot(path=shot)
      shots.append(shot)
    browser.close()
  result = dict(
      report=str(args.report.resolve()),
      report_bytes=args.report.stat().st_size,
      fetched=fetched,
      screenshots=[str(s) for s in shots],
      machine=common.machine_info(),
      **seen,
  )
  (args.out_dir / "report_check.json").write_text(json.dumps(result, indent=2))
  print(
      f"{seen['title']}: {len(seen['sections'])} patient sections, "
      f"{seen['decoded']}/{seen['images']} images decoded, "
      f"{seen['out_rows']} rows out of tolerance, page {seen['height']} px, "
      f"{len(fetched)} other requests"
  )
  for shot in shots:
    print(f"wrote {shot}")
  ok = not fetched and seen["decoded"] == seen["images"]
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
