"""Fetch the training photographs into models/train/.cache/photos (never committed).

Sources (all ship real photographs; many other wallpaper packages are abstract art):
Debian plasma-workspace-wallpapers, mate-backgrounds (nature/), lomiri-wallpapers-16.04/-20.04,
enlightenment-data (images inside .edj, extracted with edje_decc) and skimage.data colour images.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache", "photos")
MAX_SIDE = 1024  # photos are stored downscaled: training crops never need more, and it keeps decode fast

# (package, glob inside the extracted tree)
DEBIAN = [
    ("plasma-workspace-wallpapers", "usr/share/wallpapers/*/contents/images/*"),
    ("mate-backgrounds", "usr/share/backgrounds/mate/nature/*"),
    ("lomiri-wallpapers-16.04", "usr/share/backgrounds/*.jpg"),
    ("lomiri-wallpapers-20.04", "usr/share/backgrounds/*.jpg"),
]
# the plasma themes that are photographs (the rest are renders and abstract art)
PLASMA_PHOTOS = {"BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Path"}
# lomiri files that are illustrations
LOMIRI_ABSTRACT = ("analogpattern", "Painting-Colors", "Infinite-Sea", "Fossa", "Kleiber")
# enlightenment backgrounds that are illustrations
ENLIGHTENMENT_ABSTRACT = {"Dunes", "Flat-Fan", "Flat-Stone-Pattern", "Squiggle", "Squiggle-Dark", "Squiggle-Light",
                          "Squiggle-Mid"}


def run(cmd, cwd=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[:300]}")
    return r.stdout


def save(src_img, name):
    out = os.path.join(CACHE, name + ".png")
    if os.path.exists(out):
        return
    im = src_img.convert("RGB")
    s = MAX_SIDE / max(im.size)
    if s < 1:
        im = im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS)
    if min(im.size) < 256:
        return
    im.save(out)


def fetch_debian(tmp):
    for pkg, pattern in DEBIAN:
        d = os.path.join(tmp, pkg)
        os.makedirs(d, exist_ok=True)
        run(["apt-get", "download", pkg], cwd=d)
        deb = glob.glob(os.path.join(d, "*.deb"))[0]
        run(["dpkg-deb", "-x", deb, os.path.join(d, "x")])
        seen = set()
        for f in sorted(glob.glob(os.path.join(d, "x", pattern), recursive=True)):
            if pkg == "plasma-workspace-wallpapers":
                theme = f.split("/wallpapers/")[1].split("/")[0]
                if theme not in PLASMA_PHOTOS or theme in seen:
                    continue
                seen.add(theme)
                # take the largest size of each theme only
                f = max(glob.glob(os.path.dirname(f) + "/*"), key=os.path.getsize)
                key = theme
            else:
                key = os.path.splitext(os.path.basename(f))[0]
                if key.startswith(LOMIRI_ABSTRACT):
                    continue
            try:
                save(Image.open(f), f"{pkg}__{key}")
            except Exception as e:  # a broken file in a package is skipped, not fatal
                print(f"skip {f}: {e}", file=sys.stderr)


def fetch_enlightenment(tmp):
    if shutil.which("edje_decc") is None:
        print("edje_decc missing: `apt-get install libedje-bin` to add enlightenment-data photos", file=sys.stderr)
        return
    d = os.path.join(tmp, "enl")
    os.makedirs(d, exist_ok=True)
    run(["apt-get", "download", "enlightenment-data"], cwd=d)
    deb = glob.glob(os.path.join(d, "*.deb"))[0]
    run(["dpkg-deb", "-x", deb, os.path.join(d, "x")])
    for edj in sorted(glob.glob(os.path.join(d, "x", "usr/share/enlightenment/data/backgrounds/*.edj"))):
        name = os.path.splitext(os.path.basename(edj))[0]
        if name in ENLIGHTENMENT_ABSTRACT or os.path.exists(os.path.join(CACHE, f"enlightenment-data__{name}.png")):
            continue
        w = os.path.join(d, "w", name)
        os.makedirs(w, exist_ok=True)
        try:
            run(["edje_decc", edj], cwd=w)
        except RuntimeError as e:
            print(f"skip {edj}: {e}", file=sys.stderr)
            continue
        imgs = [f for f in glob.glob(os.path.join(w, "**", "*"), recursive=True)
                if f.lower().endswith((".jpg", ".jpeg", ".png"))]
        if imgs:
            big = max(imgs, key=os.path.getsize)
            try:
                im = Image.open(big)
                if min(im.size) >= 1000:
                    save(im, f"enlightenment-data__{name}")
            except Exception as e:
                print(f"skip {big}: {e}", file=sys.stderr)


def fetch_skimage():
    import skimage.data as sd
    for n in ["astronaut", "rocket", "coffee", "chelsea", "hubble_deep_field"]:
        save(Image.fromarray(getattr(sd, n)()), f"skimage__{n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-enlightenment", action="store_true")
    a = ap.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        fetch_debian(tmp)
        if not a.skip_enlightenment:
            fetch_enlightenment(tmp)
    fetch_skimage()
    print(f"{len(os.listdir(CACHE))} photos in {CACHE}")


if __name__ == "__main__":
    main()
