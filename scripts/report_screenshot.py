r"""Renders an HTML report (`surgfusion_jax.predict --report`) to one PNG, for the docs.

A docs tool, not a project dependency: it needs WeasyPrint (HTML/CSS -> PDF, uses the
system Pango/Cairo), pypdfium2 (PDF -> bitmap, bundles pdfium) and Pillow, in a venv of
their own rather than the project's:

  python3.11 -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install weasyprint pypdfium2 pillow
  .venv/bin/python -m surgfusion_jax.predict --workdir=demo/run1 \
      --video=demo/synthskill/videos/SynthSkill_B002.avi \
      --masks=demo/synthskill/masks/SynthSkill_B002.avi --report=/tmp/shot/report.html
  /tmp/shotvenv/bin/python scripts/report_screenshot.py --html=/tmp/shot/report.html \
      --png=docs/images/predict_report.png

The report is laid out on a single page as wide as a browser window (`--page_width` CSS
px) and taller than any report, so nothing is split across pages; the page is rasterised
to `--width` pixels, the empty space below the content is cropped, and the image is
quantised to `--colors` colours (0: keep full colour) to keep the PNG small.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

PX_PER_PT = 4 / 3  # CSS px per PDF point


def _imports():
    try:
        import pypdfium2
        import weasyprint
        from PIL import Image, ImageChops
    except ImportError as e:
        sys.exit(f"report_screenshot: {e.name} is missing; install it in a separate venv: "
                 "pip install weasyprint pypdfium2 pillow (see this script's docstring)")
    return weasyprint, pypdfium2, Image, ImageChops


def render(html_path: str, png_path: str, *, page_width: int = 1040, width: int = 1000,
           colors: int = 256, max_height: int = 19000) -> tuple[int, int]:
    """Writes `html_path` rendered as one PNG of `width` pixels to `png_path`; its size."""
    # max_height: 19000 CSS px = 14250 pt, under the 14400 pt page limit of PDF viewers
    weasyprint, pdfium, Image, ImageChops = _imports()
    page = weasyprint.CSS(string=f"@page {{ size: {page_width}px {max_height}px; margin: 0 }}")
    doc = weasyprint.HTML(filename=html_path).render(stylesheets=[page])
    if len(doc.pages) > 1:
        sys.exit(f"report_screenshot: the report is taller than {max_height}px; "
                 "raise --max_height")
    pdf = pdfium.PdfDocument(io.BytesIO(doc.write_pdf()))
    image = pdf[0].render(scale=width / (page_width / PX_PER_PT)).to_pil().convert("RGB")
    white = Image.new("RGB", image.size, "white")
    bbox = ImageChops.difference(image, white).getbbox()
    if bbox is None:
        sys.exit(f"report_screenshot: {html_path} rendered as a blank page")
    margin = round(width * 0.02)
    image = image.crop((0, 0, width, min(image.height, bbox[3] + margin)))
    if colors:
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    image.save(png_path, optimize=True)
    return image.size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--html", required=True, help="the report written by predict --report")
    p.add_argument("--png", required=True, help="where to write the screenshot")
    p.add_argument("--width", type=int, default=1000, help="PNG width in pixels")
    p.add_argument("--page_width", type=int, default=1040, help="layout width in CSS px")
    p.add_argument("--colors", type=int, default=256, help="palette size; 0 keeps RGB")
    p.add_argument("--max_height", type=int, default=19000, help="page height in CSS px")
    a = p.parse_args(argv)
    if not os.path.isfile(a.html):
        sys.exit(f"report_screenshot: no such file: {a.html}")
    w, h = render(a.html, a.png, page_width=a.page_width, width=a.width, colors=a.colors,
                  max_height=a.max_height)
    print(f"wrote {a.png} ({w}x{h}, {os.path.getsize(a.png) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
